// Modal dialogs on <dialog>: a delete confirmation and the API key prompt (focus stays inside, Esc closes).
import { h } from './dom.js';
import { icon } from './icons.js';

/** A modal dialog element appended to the page; `close(value)` resolves the promise that `open` returns. */
export function modal(labelText, className = '') {
  const title = h('h2', { class: 'dialog-title', id: `dialog-${Math.random().toString(36).slice(2)}` }, labelText);
  const dialog = h('dialog', { class: `dialog ${className}`, 'aria-labelledby': title.id });
  document.body.append(dialog);
  let resolve = null;
  dialog.addEventListener('close', () => {
    const value = dialog.returnValue === '' ? null : dialog.value;
    dialog.remove();
    if (resolve) resolve(value);
  });
  dialog.addEventListener('click', (event) => {
    // A click on the backdrop (outside the panel) cancels.
    if (event.target === dialog) dialog.close('');
  });
  return {
    dialog,
    title,
    open() {
      dialog.showModal();
      return new Promise((done) => {
        resolve = done;
      });
    },
    close(value) {
      dialog.value = value;
      dialog.close(value === null ? '' : 'ok');
    },
  };
}

export function confirmDelete(name) {
  const box = modal('Delete chat?', 'confirm');
  const cancel = h('button', { type: 'button', class: 'button secondary', onclick: () => box.close(null) }, 'Cancel');
  const remove = h('button', { type: 'button', class: 'button danger', onclick: () => box.close(true) }, 'Delete');
  box.dialog.append(
    h(
      'div',
      { class: 'dialog-panel' },
      box.title,
      h('p', { class: 'dialog-text' }, `“${name}” and all its messages will be deleted. This cannot be undone.`),
      h('div', { class: 'dialog-actions' }, cancel, remove),
    ),
  );
  const opened = box.open();
  cancel.focus();
  return opened.then((value) => value === true);
}

/** Asks for the server's API key; resolves to the key, or null when the user cancels. */
export function askApiKey(reason) {
  const box = modal('API key needed', 'key');
  const input = h('input', {
    type: 'password',
    class: 'text-input',
    id: 'api-key-input',
    autocomplete: 'current-password',
    spellcheck: 'false',
    required: true,
  });
  const form = h('form', { class: 'dialog-panel', method: 'dialog' });
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (key) box.close(key);
  });
  const text =
    reason === 'rejected'
      ? 'The server did not accept that key. Enter the key this server was started with.'
      : 'This server was started with an API key. Enter it once; this browser keeps it.';
  form.append(
    h('div', { class: 'dialog-heading' }, h('span', { class: 'dialog-icon' }, icon('key')), box.title),
    h('p', { class: `dialog-text${reason === 'rejected' ? ' error-text-inline' : ''}` }, text),
    h('label', { class: 'field-label', for: 'api-key-input' }, 'API key'),
    input,
    h(
      'div',
      { class: 'dialog-actions' },
      h('button', { type: 'button', class: 'button secondary', onclick: () => box.close(null) }, 'Cancel'),
      h('button', { type: 'submit', class: 'button primary' }, 'Save key'),
    ),
  );
  box.dialog.append(form);
  const opened = box.open();
  input.focus();
  return opened;
}
