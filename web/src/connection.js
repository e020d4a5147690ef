// Staying connected: a lost server is polled until it answers again, and a reply that another tab (or an
// earlier load of this page) is writing is followed by polling the session until it is finished.
import * as api from './api.js';
import { refreshSessions, reloadCurrent } from './sessions.js';
import { render, state, view } from './state.js';
import { socketLive } from './watcher.js';

const RECONNECT_DELAYS_MS = [500, 1000, 2000, 4000, 8000];
const WATCH_EVERY_MS = 700;

let reconnecting = null;

async function healthy() {
  try {
    const response = await fetch(api.url('health'), { cache: 'no-store' });
    return response.ok ? 'ok' : response.status === 503 ? 'starting' : 'ok';
  } catch {
    return 'down';
  }
}

/** Marks the connection lost and polls /health until the server is back; then reloads what is shown. */
export function reconnect() {
  if (reconnecting) return reconnecting;
  state.connection = 'lost';
  render();
  reconnecting = (async () => {
    for (let attempt = 0; ; attempt += 1) {
      const delay = RECONNECT_DELAYS_MS[Math.min(attempt, RECONNECT_DELAYS_MS.length - 1)];
      await Promise.race([new Promise((done) => setTimeout(done, delay)), onlineAgain()]);
      const health = await healthy();
      state.connection = health === 'starting' ? 'starting' : health === 'ok' ? 'ok' : 'lost';
      render();
      if (health === 'ok') break;
    }
    reconnecting = null;
    if (state.error && state.error.connection) {
      state.error = { ...state.error, title: 'The connection was lost', detail: 'ember is reachable again. Retry to go on.' };
      state.error.connection = false;
    }
    try {
      await refreshSessions();
      await reloadCurrent();
      watchIfStreaming();
    } catch {
      // The next action will show what is wrong.
    }
    render();
  })();
  return reconnecting;
}

function onlineAgain() {
  return new Promise((done) => window.addEventListener('online', done, { once: true }));
}

/** A message with status 'streaming' that this page is not writing: poll until it is finished. */
export function watchIfStreaming() {
  if (state.watching || state.streaming || state.remote) return;
  if (!state.messages.some((message) => message.status === 'streaming')) return;
  const id = state.currentId;
  if (socketLive(id)) return; // its events will tell
  state.watching = true;
  render();
  (async () => {
    try {
      for (;;) {
        await new Promise((done) => setTimeout(done, WATCH_EVERY_MS));
        if (state.currentId !== id || state.streaming || state.remote) break;
        const session = await reloadCurrent();
        if (!session || !(session.messages || []).some((message) => message.status === 'streaming')) break;
      }
    } catch (error) {
      if (error instanceof api.ConnectionError) reconnect();
    } finally {
      state.watching = false;
      render();
      refreshSessions().catch(() => {});
      if (state.queued && state.currentId === id && !state.streaming && !state.remote) {
        state.queued = false;
        view.sendQueued();
      }
    }
  })();
}
