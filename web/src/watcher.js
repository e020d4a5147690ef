// A live view of the open session over its WebSocket: replies that another tab (or an earlier load of
// this page) is writing grow here too. This page's own replies arrive over their SSE stream instead.
import * as api from './api.js';
import { refreshSessions, reloadCurrent } from './sessions.js';
import { render, state, view } from './state.js';

const RETRY_DELAYS_MS = [1000, 2000, 4000, 8000, 15000];
const REFUSED = new Set([4401, 4404]); // wrong key, no such session: retrying would not help

let socket = null;
let socketSession = null;
let attempts = 0;
let retryTimer = 0;

/** True while the open session's socket is connected (then no polling is needed). */
export function socketLive(sessionId) {
  return Boolean(socket && socketSession === sessionId && socket.readyState === WebSocket.OPEN);
}

/** Follows session `id` (null: none); a new id closes the previous socket. */
export function watchSession(id) {
  if (socketSession === id && socket) return;
  close();
  socketSession = id;
  attempts = 0;
  if (id && typeof WebSocket !== 'undefined') connect(id);
}

function close() {
  clearTimeout(retryTimer);
  if (socket) {
    const old = socket;
    socket = null;
    old.close(1000);
  }
  if (state.remote) {
    state.remote = null;
    state.watching = false;
  }
}

function connect(id) {
  let ws;
  try {
    ws = new WebSocket(api.websocketUrl(`v1/sessions/${encodeURIComponent(id)}/ws`));
  } catch {
    return;
  }
  socket = ws;
  ws.addEventListener('open', () => {
    // The key goes in the first message rather than the address, which servers and proxies log.
    ws.send(JSON.stringify({ type: 'auth', token: api.apiKey() }));
  });
  ws.addEventListener('message', (message) => {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    if (event.type === 'ready') attempts = 0;
    if (socket === ws) handle(id, event);
  });
  ws.addEventListener('close', (event) => {
    if (socket !== ws) return;
    socket = null;
    if (state.remote && state.remote.sessionId === id) {
      state.remote = null;
      state.watching = false;
      reloadCurrent().catch(() => {});
    }
    if (REFUSED.has(event.code) || socketSession !== id) return;
    const delay = RETRY_DELAYS_MS[Math.min(attempts, RETRY_DELAYS_MS.length - 1)];
    attempts += 1;
    retryTimer = setTimeout(() => socketSession === id && !socket && connect(id), delay);
  });
}

function handle(id, event) {
  if (state.currentId !== id) return;
  if (state.streaming && state.streaming.sessionId === id) return; // our own reply: its SSE stream draws it
  if (event.type === 'start') {
    const message = event.message || {};
    state.remote = { sessionId: id, messageId: event.message_id, text: message.content || '' };
    state.watching = true;
    if (!state.messages.some((item) => item.id === event.message_id)) {
      // A new turn: fetch the path (its user message too); the overlay keeps the text that grows.
      reloadCurrent().catch(() => {});
    } else {
      overlay();
    }
    render();
  } else if (event.type === 'delta' && state.remote && state.remote.messageId === event.message_id) {
    state.remote.text += event.text || '';
    const target = overlay();
    if (target) view.streamed(target);
  } else if (event.type === 'done' || event.type === 'error') {
    if (!state.remote) return;
    state.remote = null;
    state.watching = false;
    reloadCurrent()
      .then(() => {
        if (state.queued) {
          // A message typed while the other tab's reply streamed goes now.
          state.queued = false;
          view.sendQueued();
        }
        return refreshSessions();
      })
      .catch(() => {});
    render();
  }
}

/** Writes the remote reply's text into the drawn message; returns that message (or null). */
export function overlay() {
  const remote = state.remote;
  if (!remote || remote.sessionId !== state.currentId) return null;
  const target = state.messages.find((item) => item.id === remote.messageId);
  if (!target) return null;
  target.content = remote.text;
  target.status = 'streaming';
  return target;
}
