// The page: wires the views to the actions and draws the state.
import * as api from './api.js';
import { setupComposer } from './composer.js';
import { reconnect, watchIfStreaming } from './connection.js';
import { askApiKey, confirmDelete } from './dialogs.js';
import { icon } from './icons.js';
import { fillBody, renderEmpty, renderMessages } from './messages.js';
import * as replies from './replies.js';
import * as sessions from './sessions.js';
import { openSettings } from './settings.js';
import { renderSidebar, sessionTitle } from './sidebar.js';
import { render, state, view } from './state.js';
import { overlay, watchSession } from './watcher.js';

const $ = (id) => document.getElementById(id);
const elements = {
  app: $('app'),
  sidebar: $('sidebar'),
  backdrop: $('backdrop'),
  list: $('session-list'),
  search: $('search'),
  title: $('chat-title'),
  banner: $('banner'),
  conversation: $('conversation'),
  messages: $('messages'),
  jump: $('jump'),
  stats: { model: $('stat-model'), context: $('stat-context'), speed: $('stat-speed') },
  announcer: $('announcer'),
};

let following = true; // the view sticks to the end of the conversation unless the user scrolls up

function atEnd() {
  const { scrollTop, scrollHeight, clientHeight } = elements.conversation;
  return scrollHeight - scrollTop - clientHeight < 48;
}

function scrollToEnd() {
  elements.conversation.scrollTop = elements.conversation.scrollHeight;
}

elements.conversation.addEventListener('scroll', () => {
  following = atEnd();
  elements.jump.hidden = following || !replies.busy();
});
// A phone turned sideways, the window resized, the box growing: stay at the end when following.
new ResizeObserver(() => {
  if (following) scrollToEnd();
}).observe(elements.conversation);
elements.jump.append(icon('down'));
elements.jump.addEventListener('click', () => {
  following = true;
  scrollToEnd();
  elements.jump.hidden = true;
});

function announce(text) {
  elements.announcer.textContent = '';
  setTimeout(() => {
    elements.announcer.textContent = text;
  }, 30);
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Plain http on another address is not a secure context: the old way still copies.
    const scratch = document.createElement('textarea');
    scratch.value = text;
    scratch.setAttribute('readonly', '');
    scratch.className = 'clipboard-scratch';
    document.body.append(scratch);
    scratch.select();
    document.execCommand('copy');
    scratch.remove();
  }
  announce('Copied');
  if (button) {
    button.classList.add('copied');
    setTimeout(() => button.classList.remove('copied'), 1400);
  }
}

const messageHandlers = {
  copy,
  startEdit(id) {
    state.editingId = id;
    render();
  },
  cancelEdit() {
    state.editingId = null;
    render();
    composer.focus();
  },
  submitEdit: (message, text) => replies.editMessage(message, text),
  regenerate: () => replies.regenerate(),
  continueReply: () => replies.continueReply(),
  select: (id) => replies.selectAlternative(id),
  retry() {
    const retry = state.error && state.error.retry;
    state.error = null;
    render();
    if (retry) retry();
  },
  dismissError() {
    state.error = null;
    render();
    composer.focus();
  },
};

const sidebarHandlers = {
  select(id) {
    closeSidebar();
    if (id !== state.currentId) sessions.openSession(id).then(watchIfStreaming);
    composer.focus();
  },
  startRename(id) {
    state.renamingId = id;
    render();
  },
  async rename(id, title) {
    state.renamingId = null;
    render();
    if (title === null) return;
    try {
      await sessions.renameSession(id, title || null);
    } catch (error) {
      announce(`Rename failed: ${error.message}`);
    }
  },
  async remove(session) {
    if (!(await confirmDelete(sessionTitle(session)))) return;
    try {
      await sessions.deleteSession(session.id);
      announce('Chat deleted');
    } catch (error) {
      announce(`Delete failed: ${error.message}`);
    }
  },
};

function formatTokens(count) {
  if (count >= 10000) return `${Math.round(count / 1000)}k`;
  if (count >= 1000) return `${(count / 1000).toFixed(1).replace(/\.0$/, '')}k`;
  return String(count);
}

function drawStats() {
  const { model, context, speed } = elements.stats;
  model.textContent = state.model ? state.model.name : '';
  const usage = state.currentId ? state.usage.get(state.currentId) : null;
  const length = state.model && state.model.contextLength;
  context.textContent = '';
  if (usage && typeof usage.totalTokens === 'number' && length) {
    const share = Math.min(100, Math.round((100 * usage.totalTokens) / length));
    context.textContent = `${formatTokens(usage.totalTokens)} / ${formatTokens(length)} context (${share}%)`;
  } else if (length) {
    context.textContent = `${formatTokens(length)} context`;
  }
  speed.textContent = usage && usage.tokensPerSecond ? `${usage.tokensPerSecond.toFixed(1)} tokens/s` : '';
}

function drawBanner() {
  const banner = elements.banner;
  if (state.connection === 'ok') {
    banner.hidden = true;
    return;
  }
  banner.hidden = false;
  banner.textContent = state.connection === 'starting' ? 'The server is starting…' : 'Connection lost. Reconnecting…';
}

function drawConversation() {
  const keepScroll = elements.conversation.scrollTop;
  if (!state.messages.length && !state.error) {
    renderEmpty(elements.messages, state.model && state.model.name);
  } else {
    renderMessages(
      elements.messages,
      {
        messages: state.messages,
        streamingId: state.streaming && state.streaming.sessionId === state.currentId ? state.streaming.target.id : null,
        busy: replies.busy(),
        editingId: state.editingId,
        error: state.error,
      },
      messageHandlers,
    );
  }
  elements.messages.setAttribute('aria-busy', String(replies.busy()));
  elements.messages.classList.toggle('is-empty', !state.messages.length && !state.error);
  if (following) scrollToEnd();
  else elements.conversation.scrollTop = keepScroll;
}

let pendingFrame = 0; // one redraw of the growing reply per animation frame
let pendingMessage = null;

view.render = () => {
  if (pendingFrame) {
    // A full redraw shows the latest text anyway; a late frame must not draw over it.
    cancelAnimationFrame(pendingFrame);
    pendingFrame = 0;
  }
  watchSession(state.currentId);
  renderSidebar(
    elements.list,
    {
      sessions: state.sessions,
      currentId: state.currentId,
      query: state.query,
      loading: !state.sessionsLoaded,
      renamingId: state.renamingId,
    },
    sidebarHandlers,
  );
  const title = state.currentId ? sessionTitle(state.current) : 'New chat';
  elements.title.textContent = title;
  document.title = state.currentId ? `${title} · ember` : 'ember';
  drawBanner();
  drawConversation();
  drawStats();
  composer.update({ busy: replies.busy(), queued: state.queued });
  elements.jump.hidden = following || !replies.busy();
};

view.streamed = (message) => {
  // Many deltas per frame: redraw the growing reply once per animation frame.
  pendingMessage = message;
  if (pendingFrame) return;
  pendingFrame = requestAnimationFrame(() => {
    pendingFrame = 0;
    const target = pendingMessage;
    const selector = target && `.message.streaming[data-message-id="${CSS.escape(target.id)}"] .message-body`;
    const element = selector && elements.messages.querySelector(selector);
    if (!element) return; // finished (and drawn in full) since this frame was asked for
    fillBody(element, target, { streaming: true, onCopy: copy });
    if (following) scrollToEnd();
  });
};
view.overlay = overlay;

view.follow = () => {
  following = true;
};
view.hint = (text) => composer.hint(text);
view.sendQueued = () => composer.submit();
view.restoreDraft = (text) => composer.restore(text);
view.clearDraft = (text) => composer.clear(text);

const composer = setupComposer({
  send(text) {
    following = true;
    return replies.send(text);
  },
  stop: () => replies.stop(),
  cancelQueued() {
    state.queued = false;
    render();
  },
});

function openSidebar() {
  elements.app.classList.add('sidebar-open');
  elements.backdrop.hidden = false;
  $('open-sidebar').setAttribute('aria-expanded', 'true');
  // Focus goes into the drawer (not the search box: on a phone that would pop the keyboard up).
  const target = elements.list.querySelector('.session.current .session-open') || $('new-chat');
  setTimeout(() => target.focus(), 0);
}

function closeSidebar() {
  if (!elements.app.classList.contains('sidebar-open')) return;
  const hadFocus = elements.sidebar.contains(document.activeElement);
  elements.app.classList.remove('sidebar-open');
  elements.backdrop.hidden = true;
  $('open-sidebar').setAttribute('aria-expanded', 'false');
  if (hadFocus) $('open-sidebar').focus();
}

function setupChrome() {
  $('open-sidebar').append(icon('menu'));
  $('close-sidebar').append(icon('close'));
  $('open-settings').append(icon('settings'));
  document.querySelector('.new-chat-icon').append(icon('plus'));
  $('open-sidebar').addEventListener('click', openSidebar);
  $('close-sidebar').addEventListener('click', closeSidebar);
  elements.backdrop.addEventListener('click', closeSidebar);
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && elements.app.classList.contains('sidebar-open')) closeSidebar();
    if ((event.ctrlKey || event.metaKey) && event.shiftKey && event.key.toLowerCase() === 'o') {
      event.preventDefault();
      startNewChat();
    }
  });
  $('new-chat').addEventListener('click', startNewChat);
  $('open-settings').addEventListener('click', showSettings);
  let searchTimer = 0;
  elements.search.addEventListener('input', () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      state.query = elements.search.value;
      sessions.refreshSessions().catch(handleBackgroundError);
    }, 180);
  });
  document.addEventListener('visibilitychange', () => {
    // Another tab may have changed the conversations meanwhile.
    if (document.visibilityState === 'visible' && !replies.busy()) {
      sessions.refreshSessions().catch(handleBackgroundError);
      if (state.currentId) sessions.reloadCurrent().then(watchIfStreaming).catch(handleBackgroundError);
    }
  });
}

function startNewChat() {
  closeSidebar();
  sessions.newChat();
  composer.focus();
}

function handleBackgroundError(error) {
  if (error instanceof api.ConnectionError) reconnect();
}

function showSettings() {
  const open = state.currentId && state.current;
  const values = open
    ? { system_prompt: state.current.system_prompt, settings: state.current.settings }
    : sessions.newChatDefaults();
  const about = [];
  if (state.model) {
    about.push(['Model', state.model.id]);
    if (state.model.contextLength) about.push(['Context', `${state.model.contextLength.toLocaleString()} tokens`]);
  }
  openSettings({
    values,
    scopeText: open ? 'These settings apply to this chat.' : 'These settings apply to new chats.',
    about,
    onForgetKey: api.apiKey() ? () => api.setApiKey('') : null,
    onExport: open ? (format) => exportSession(state.currentId, sessionTitle(state.current), format) : null,
    async save(changes) {
      if (open) await sessions.updateSession(state.currentId, changes);
      else sessions.saveNewChatDefaults(changes);
    },
  });
}

/** Downloads the chat as Markdown or JSON (fetched with the key, so it works behind one too). */
async function exportSession(id, title, format) {
  try {
    const response = await api.request('GET', `v1/sessions/${encodeURIComponent(id)}/export?format=${format}`, undefined, {
      accept: format === 'json' ? 'application/json' : 'text/markdown',
    });
    const address = URL.createObjectURL(await response.blob());
    const link = document.createElement('a');
    link.href = address;
    link.download = `${title.replace(/[^\w\- ]+/g, '').trim().replace(/\s+/g, '-') || 'chat'}.${format === 'json' ? 'json' : 'md'}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(address), 10000);
  } catch (error) {
    announce(`Export failed: ${error.message}`);
  }
}

async function loadModel() {
  const payload = await api.json('GET', 'v1/models');
  const model = (payload && payload.data && payload.data[0]) || null;
  if (!model) return;
  const contextLength =
    model.context_length ?? model.max_model_len ?? model.context_window ?? model.meta?.n_ctx_train ?? null;
  const name = String(model.id).split(/[\\/]/).filter(Boolean).pop() || String(model.id);
  state.model = { id: String(model.id), name, contextLength };
  render();
}

async function start() {
  setupChrome();
  api.onKeyNeeded((reason) => askApiKey(reason));
  render();
  composer.focus();
  try {
    await sessions.refreshSessions();
    const last = sessions.lastSessionId();
    if (last && state.sessions.some((session) => session.id === last)) {
      await sessions.openSession(last, { quiet: true });
      watchIfStreaming();
    }
  } catch (error) {
    state.sessionsLoaded = true;
    if (error instanceof api.ConnectionError) reconnect();
    else state.error = { title: 'Could not load your chats', detail: error.message, retry: () => location.reload() };
    render();
  }
  loadModel().catch(() => {});
}

start();
