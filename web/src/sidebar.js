// The list of conversations: newest first, grouped by day, with inline rename and a delete button.
import { clear, h } from './dom.js';
import { icon } from './icons.js';

const DAY = 24 * 60 * 60;

export function sessionTitle(session) {
  return (session && session.title && session.title.trim()) || 'New chat';
}

function groupName(seconds, now) {
  const startOfToday = new Date(now * 1000);
  startOfToday.setHours(0, 0, 0, 0);
  const today = startOfToday.getTime() / 1000;
  if (seconds >= today) return 'Today';
  if (seconds >= today - DAY) return 'Yesterday';
  if (seconds >= today - 7 * DAY) return 'Previous 7 days';
  if (seconds >= today - 30 * DAY) return 'Previous 30 days';
  return 'Older';
}

function toSeconds(value) {
  if (typeof value === 'number') return value > 1e12 ? value / 1000 : value;
  const parsed = Date.parse(value);
  return Number.isNaN(parsed) ? 0 : parsed / 1000;
}

/**
 * Draws the sessions into `container`. handlers: select(id), rename(id, title), remove(session).
 * `renamingId` puts that row in edit mode.
 */
export function renderSidebar(container, { sessions, currentId, query, loading, renamingId }, handlers) {
  clear(container);
  if (!sessions.length) {
    const text = loading ? 'Loading chats…' : query ? 'No chats match this search.' : 'No chats yet.';
    container.append(h('p', { class: loading ? 'session-empty session-loading' : 'session-empty' }, text));
    return;
  }
  const now = Date.now() / 1000;
  let group = null;
  let list = null;
  for (const session of sessions) {
    const name = groupName(toSeconds(session.updated_at ?? session.created_at), now);
    if (name !== group) {
      group = name;
      list = h('ul', { class: 'session-group-list' });
      container.append(h('div', { class: 'session-group' }, h('h2', { class: 'session-group-title' }, name), list));
    }
    list.append(row(session, session.id === currentId, session.id === renamingId, handlers));
  }
}

function row(session, current, renaming, handlers) {
  const title = sessionTitle(session);
  const item = h('li', { class: `session${current ? ' current' : ''}`, dataset: { sessionId: session.id } });
  if (renaming) {
    const input = h('input', {
      class: 'session-rename',
      type: 'text',
      value: title === 'New chat' && !session.title ? '' : title,
      'aria-label': 'Chat title',
      maxlength: '200',
    });
    let done = false;
    const finish = (save) => {
      if (done) return;
      done = true;
      handlers.rename(session.id, save ? input.value.trim() : null);
    };
    input.addEventListener('keydown', (event) => {
      if (event.key === 'Enter') {
        event.preventDefault();
        finish(true);
      } else if (event.key === 'Escape') {
        event.preventDefault();
        finish(false);
      }
    });
    input.addEventListener('blur', () => finish(true));
    item.append(input);
    queueMicrotask(() => {
      input.focus();
      input.select();
    });
    return item;
  }
  const open = h(
    'button',
    {
      type: 'button',
      class: 'session-open',
      'aria-current': current ? 'page' : null,
      title,
      onclick: () => handlers.select(session.id),
    },
    h('span', { class: 'session-title' }, title),
  );
  const rename = h(
    'button',
    {
      type: 'button',
      class: 'icon-button small',
      'aria-label': 'Rename',
      title: 'Rename',
      onclick: () => handlers.startRename(session.id),
    },
    icon('rename'),
  );
  const remove = h(
    'button',
    {
      type: 'button',
      class: 'icon-button small danger',
      'aria-label': 'Delete',
      title: 'Delete',
      onclick: () => handlers.remove(session),
    },
    icon('trash'),
  );
  item.append(open, h('div', { class: 'session-actions' }, rename, remove));
  return item;
}
