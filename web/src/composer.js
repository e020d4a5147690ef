// The message box: Enter sends, Shift+Enter makes a new line, it grows with its text, and it stays
// usable while a reply streams (a message sent then waits in the box until the reply ends).
import { icon } from './icons.js';

const MAX_HEIGHT_PX = 220;

export function setupComposer({ send, stop, cancelQueued }) {
  const form = document.getElementById('composer');
  const input = document.getElementById('prompt');
  const sendButton = document.getElementById('send');
  const stopButton = document.getElementById('stop');
  const hintLine = document.getElementById('hint');
  sendButton.append(icon('send'));
  stopButton.querySelector('.stop-icon').append(icon('stop'));
  let busy = false;
  let queued = false;
  let hintTimer = 0;

  function grow() {
    input.style.height = 'auto';
    input.style.height = `${Math.min(input.scrollHeight, MAX_HEIGHT_PX)}px`;
    input.classList.toggle('scrolls', input.scrollHeight > MAX_HEIGHT_PX);
  }

  function refresh() {
    sendButton.disabled = !input.value.trim();
    stopButton.hidden = !busy;
    form.classList.toggle('busy', busy);
  }

  function hint(text, { sticky = false } = {}) {
    clearTimeout(hintTimer);
    hintLine.textContent = text;
    if (!sticky && text) hintTimer = setTimeout(() => (hintLine.textContent = queued ? hintLine.textContent : ''), 5000);
  }

  async function submit() {
    const text = input.value.trim();
    if (!text) return;
    const sending = send(text);
    if (sending === false) return; // a reply is streaming: the text waits in the box until it ends
    input.value = '';
    grow();
    refresh();
    await sending;
  }

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    submit();
  });
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      submit();
    } else if (event.key === 'Escape' && queued) {
      event.preventDefault();
      cancelQueued();
      hint('Not sent; your message stays here.');
    }
  });
  input.addEventListener('input', () => {
    grow();
    refresh();
    if (queued && !input.value.trim()) cancelQueued();
  });
  stopButton.addEventListener('click', () => {
    stop();
    input.focus();
  });
  refresh();

  return {
    focus() {
      input.focus({ preventScroll: true });
    },
    hint,
    submit,
    clear(text) {
      if (input.value.trim() !== text) return;
      input.value = '';
      grow();
      refresh();
    },
    /** Puts a message the server refused back in the box, unless the user has typed something new. */
    restore(text) {
      if (input.value.trim()) return;
      input.value = text;
      grow();
      refresh();
    },
    update(next) {
      busy = next.busy;
      const wasQueued = queued;
      queued = next.queued;
      if (queued) hint('Sends when this reply finishes. Press Esc to keep it here instead.', { sticky: true });
      else if (wasQueued) hint('');
      refresh();
    },
  };
}
