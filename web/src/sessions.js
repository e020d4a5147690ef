// Session-level actions: list, open, create, rename, delete; and loading a session's active path.
import * as api from './api.js';
import { describeError } from './errors.js';
import { render, state, view } from './state.js';

const LAST_SESSION = 'ember.lastSession';
const DEFAULTS = 'ember.newChatSettings';

function remember(id) {
  try {
    if (id) localStorage.setItem(LAST_SESSION, id);
    else localStorage.removeItem(LAST_SESSION);
  } catch {
    // No storage: the last chat is simply not restored.
  }
}

export function lastSessionId() {
  try {
    return localStorage.getItem(LAST_SESSION);
  } catch {
    return null;
  }
}

/** Settings for chats not created yet (the Settings dialog edits these while no chat is open). */
export function newChatDefaults() {
  try {
    return JSON.parse(localStorage.getItem(DEFAULTS) || 'null') || { system_prompt: null, settings: {} };
  } catch {
    return { system_prompt: null, settings: {} };
  }
}

export function saveNewChatDefaults(values) {
  try {
    localStorage.setItem(DEFAULTS, JSON.stringify(values));
  } catch {
    // Kept for this page only.
  }
}

function listOf(payload) {
  if (Array.isArray(payload)) return payload;
  return payload?.data ?? payload?.sessions ?? [];
}

export async function refreshSessions() {
  const query = state.query.trim();
  const path = query ? `v1/sessions?q=${encodeURIComponent(query)}` : 'v1/sessions';
  const sessions = listOf(await api.json('GET', path));
  if (state.query.trim() !== query) return; // a newer search is on its way
  state.sessions = sessions;
  state.sessionsLoaded = true;
  render();
}

function upsert(session) {
  const index = state.sessions.findIndex((item) => item.id === session.id);
  const { messages: _messages, ...summary } = session;
  if (index >= 0) state.sessions[index] = { ...state.sessions[index], ...summary };
  else state.sessions.unshift(summary);
}

/** Fetches the open session; keeps the drawn messages while this page itself streams into it. */
export async function reloadCurrent() {
  const id = state.currentId;
  if (!id) return null;
  const session = await api.json('GET', `v1/sessions/${encodeURIComponent(id)}`);
  if (state.currentId !== id) return null;
  state.current = session;
  upsert(session);
  if (!(state.streaming && state.streaming.sessionId === id)) {
    state.messages = session.messages || [];
    view.overlay(); // a reply growing over the WebSocket is fresher than the stored text
    measureContext(session).catch(() => {});
  }
  render();
  return session;
}

/** How much of the context the conversation fills: its messages through the chat template. */
async function measureContext(session) {
  const messages = (session.messages || []).map((message) => ({ role: message.role, content: message.content }));
  if (session.system_prompt) messages.unshift({ role: 'system', content: session.system_prompt });
  if (!messages.length) {
    state.usage.set(session.id, { ...state.usage.get(session.id), totalTokens: 0 });
    return;
  }
  const counted = await api.json('POST', 'tokenize', { messages });
  const count = counted?.count ?? counted?.tokens?.length;
  if (typeof count !== 'number') return;
  state.usage.set(session.id, { ...state.usage.get(session.id), totalTokens: count });
  if (state.currentId === session.id) render();
}

export async function openSession(id, { quiet = false } = {}) {
  if (state.currentId !== id) {
    state.currentId = id;
    state.current = state.sessions.find((session) => session.id === id) || null;
    const run = state.streaming;
    state.messages = run && run.sessionId === id ? run.messages : [];
    state.error = null;
    state.editingId = null;
    view.follow();
  }
  remember(id);
  render();
  try {
    await reloadCurrent();
  } catch (error) {
    if (error instanceof api.ApiError && error.status === 404) {
      // Deleted elsewhere (or never ours): fall back to a new chat.
      state.sessions = state.sessions.filter((session) => session.id !== id);
      newChat();
      return;
    }
    if (quiet) throw error;
    state.error = { ...describeError(error), retry: () => openSession(id) };
    render();
  }
}

export function newChat() {
  state.currentId = null;
  state.current = null;
  state.messages = [];
  state.error = null;
  state.editingId = null;
  remember(null);
  view.follow();
  render();
}

/** The open session, created first (titled after its first message) when this is a new chat. */
export async function ensureSession(firstText) {
  if (state.currentId) return state.currentId;
  const defaults = newChatDefaults();
  const body = { title: titleFrom(firstText) };
  if (defaults.system_prompt) body.system_prompt = defaults.system_prompt;
  const settings = Object.fromEntries(Object.entries(defaults.settings || {}).filter(([, value]) => value !== null));
  if (Object.keys(settings).length) body.settings = settings;
  const session = await api.json('POST', 'v1/sessions', body);
  upsert(session);
  state.currentId = session.id;
  state.current = session;
  remember(session.id);
  return session.id;
}

export function titleFrom(text) {
  const line = text.replace(/\s+/g, ' ').trim();
  if (line.length <= 48) return line;
  const cut = line.slice(0, 48);
  const space = cut.lastIndexOf(' ');
  return `${(space > 24 ? cut.slice(0, space) : cut).trim()}…`;
}

export async function renameSession(id, title) {
  const session = await api.json('PATCH', `v1/sessions/${encodeURIComponent(id)}`, { title });
  upsert(session || { id, title });
  if (state.currentId === id && session) state.current = { ...state.current, ...session };
  render();
}

export async function deleteSession(id) {
  await api.json('DELETE', `v1/sessions/${encodeURIComponent(id)}`);
  state.sessions = state.sessions.filter((session) => session.id !== id);
  state.usage.delete(id);
  if (state.currentId === id) newChat();
  else render();
}

export async function updateSession(id, changes) {
  const session = await api.json('PATCH', `v1/sessions/${encodeURIComponent(id)}`, changes);
  if (session) {
    upsert(session);
    if (state.currentId === id) state.current = { ...state.current, ...session };
  }
  render();
}
