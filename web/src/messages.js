// The conversation view: messages (Markdown for replies, plain text for the user), their actions, errors.
import { clear, h } from './dom.js';
import { icon } from './icons.js';
import { renderMarkdown } from './markdown.js';

function actionButton(name, label, onclick, extra = {}) {
  return h('button', { type: 'button', class: 'action', 'aria-label': label, title: label, onclick, ...extra }, icon(name));
}

/** Where this message sits among its siblings: {position (1-based), count, ids}, or null. */
export function alternativesOf(message) {
  const alternatives = message.alternatives;
  if (!alternatives) return null;
  const ids = alternatives.ids || alternatives.sibling_ids || alternatives.message_ids || [];
  const count = alternatives.count ?? ids.length;
  if (!count || count < 2) return null;
  let position = ids.indexOf(message.id) + 1;
  if (!position) position = (alternatives.index ?? 0) + 1;
  return { position, count, ids };
}

export function renderEmpty(container, modelName) {
  clear(container);
  container.append(
    h(
      'div',
      { class: 'empty' },
      h('img', { class: 'empty-mark', src: 'static/favicon.svg', alt: '', width: '44', height: '44' }),
      h('h2', { class: 'empty-title' }, 'What can I help with?'),
      h(
        'p',
        { class: 'empty-text' },
        modelName ? `${modelName} runs on this machine. Your chats stay here too.` : 'Your chats stay on this machine.',
      ),
    ),
  );
}

/** Fills a reply's body; `streaming` adds the caret. Markdown is rendered and sanitized. */
export function fillBody(body, message, { streaming = false, onCopy } = {}) {
  clear(body);
  if (message.role === 'user') {
    body.append(h('p', { class: 'plain' }, message.content));
    return;
  }
  if (!message.content && streaming) {
    body.append(
      h(
        'div',
        { class: 'typing', 'aria-label': 'Writing' },
        h('span', { class: 'dot' }),
        h('span', { class: 'dot' }),
        h('span', { class: 'dot' }),
      ),
    );
    return;
  }
  body.append(renderMarkdown(message.content, { onCopy }));
  if (streaming) {
    const caret = h('span', { class: 'caret', 'aria-hidden': 'true' });
    const last = body.lastElementChild;
    const target = last && /^(P|LI|H\d)$/.test(last.tagName) ? last : last && last.querySelector('li:last-child, p:last-child');
    (target || body).append(caret);
  }
}

/**
 * Draws the active path. state: {messages, streamingId, busy, editingId, error}.
 * handlers: copy(text, button), startEdit(id), cancelEdit(), submitEdit(message, text), regenerate(),
 * continueReply(), select(id), retry(), dismissError().
 */
export function renderMessages(container, state, handlers) {
  clear(container);
  const { messages, streamingId, busy, editingId, error } = state;
  const lastAssistant = [...messages].reverse().find((message) => message.role === 'assistant');
  for (const message of messages) {
    const isLast = lastAssistant && message.id === lastAssistant.id && message === messages[messages.length - 1];
    container.append(
      messageElement(message, {
        streaming: message.id === streamingId || message.status === 'streaming',
        busy,
        isLast,
        editing: message.id === editingId,
        handlers,
      }),
    );
  }
  if (error) container.append(errorCard(error, handlers));
}

function messageElement(message, { streaming, busy, isLast, editing, handlers }) {
  const role = message.role === 'user' ? 'user' : 'assistant';
  const element = h('article', {
    class: `message ${role}${streaming ? ' streaming' : ''}`,
    dataset: { messageId: message.id, role, status: streaming ? 'streaming' : message.status || 'complete' },
    'aria-label': role === 'user' ? 'You said' : 'ember said',
  });
  if (editing) {
    element.append(editor(message, handlers));
    return element;
  }
  const body = h('div', { class: 'message-body' });
  fillBody(body, message, { streaming, onCopy: handlers.copy });
  element.append(body);
  if (!streaming && message.status === 'interrupted') {
    element.append(h('p', { class: 'message-note' }, 'Stopped before the end of the reply.'));
  }
  const actions = h('div', { class: 'message-actions' });
  const alternatives = alternativesOf(message);
  if (alternatives) {
    const { position, count, ids } = alternatives;
    const previous = actionButton('left', 'Previous version', () => handlers.select(ids[position - 2]), {
      disabled: busy || position <= 1,
    });
    const next = actionButton('right', 'Next version', () => handlers.select(ids[position]), {
      disabled: busy || position >= count || !ids[position],
    });
    actions.append(
      h(
        'div',
        { class: 'alternatives', role: 'group', 'aria-label': 'Versions' },
        previous,
        h('span', { class: 'alternatives-count' }, `${position} / ${count}`),
        next,
      ),
    );
  }
  if (!streaming) {
    actions.append(actionButton('copy', 'Copy', (event) => handlers.copy(message.content, event.currentTarget)));
    if (role === 'user') {
      actions.append(actionButton('edit', 'Edit', () => handlers.startEdit(message.id), { disabled: busy }));
    } else if (isLast) {
      actions.append(actionButton('regenerate', 'Regenerate', () => handlers.regenerate(), { disabled: busy }));
      actions.append(actionButton('continue', 'Continue', () => handlers.continueReply(), { disabled: busy }));
    }
  }
  element.append(actions);
  return element;
}

function editor(message, handlers) {
  const textarea = h('textarea', { class: 'edit-input', 'aria-label': 'Edit message', rows: '3' });
  textarea.value = message.content;
  const submit = () => {
    const text = textarea.value.trim();
    if (text) handlers.submitEdit(message, text);
  };
  textarea.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    } else if (event.key === 'Escape') {
      event.preventDefault();
      handlers.cancelEdit();
    }
  });
  queueMicrotask(() => {
    textarea.focus();
    textarea.setSelectionRange(textarea.value.length, textarea.value.length);
    textarea.style.height = `${Math.min(textarea.scrollHeight + 2, 320)}px`;
  });
  textarea.addEventListener('input', () => {
    textarea.style.height = 'auto';
    textarea.style.height = `${Math.min(textarea.scrollHeight + 2, 320)}px`;
  });
  return h(
    'div',
    { class: 'editor' },
    textarea,
    h(
      'div',
      { class: 'editor-actions' },
      h('button', { type: 'button', class: 'button secondary', onclick: () => handlers.cancelEdit() }, 'Cancel'),
      h('button', { type: 'button', class: 'button primary', onclick: submit }, 'Save and send'),
    ),
  );
}

function errorCard(error, handlers) {
  const card = h(
    'div',
    { class: 'error-card', role: 'alert' },
    h('div', { class: 'error-icon' }, icon('warning')),
    h(
      'div',
      { class: 'error-text' },
      h('p', { class: 'error-title' }, error.title),
      error.detail ? h('p', { class: 'error-detail' }, error.detail) : null,
    ),
  );
  const buttons = h('div', { class: 'error-actions' });
  if (error.retry) {
    buttons.append(
      h('button', { type: 'button', class: 'button primary', onclick: () => handlers.retry() }, icon('retry'), 'Retry'),
    );
  }
  buttons.append(
    h('button', { type: 'button', class: 'button secondary', onclick: () => handlers.dismissError() }, 'Dismiss'),
  );
  card.append(buttons);
  return card;
}
