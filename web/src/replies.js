// Replies: send, regenerate, edit, continue, stop and choosing an alternative, streamed over SSE.
import * as api from './api.js';
import { reconnect } from './connection.js';
import { describeError } from './errors.js';
import { ensureSession, refreshSessions, reloadCurrent } from './sessions.js';
import { render, state, view } from './state.js';

const PENDING = 'pending-reply';
const STOP_GRACE_MS = 4000; // after Stop, how long the stream may take to finish before the page cuts it

function sessionPath(id, tail = '') {
  return `v1/sessions/${encodeURIComponent(id)}${tail}`;
}

export function busy() {
  return Boolean(state.streaming || state.watching || state.remote);
}

function showError(error, retry) {
  const described = describeError(error);
  state.error = { ...described, retry };
  if (described.connection) reconnect();
  render();
}

/**
 * Runs one streamed reply. `prepare(messages)` returns the messages to draw while it streams and the
 * message that receives the text ({target, base}: base is text already there, for Continue).
 */
async function stream({ path, body, prepare, retry, restore = null }) {
  const sessionId = state.currentId;
  const controller = new AbortController();
  const { messages, target, base = '' } = prepare(state.messages.slice());
  state.messages = messages;
  state.error = null;
  state.editingId = null;
  const run = {
    sessionId,
    controller,
    messages, // what to draw if the user leaves this chat and comes back while it streams
    stopped: false,
    target,
    base,
    text: '',
    firstAt: null,
    lastAt: null,
    deltas: 0,
  };
  state.streaming = run;
  view.follow();
  render();
  let usage = null;
  let finished = false;
  try {
    const response = await api.request('POST', sessionPath(sessionId, path), { ...body, stream: true }, {
      signal: controller.signal,
      accept: 'text/event-stream',
    });
    for await (const event of api.events(response)) {
      if (event.type === 'start') {
        run.started = true;
        const id = event.message_id ?? event.message?.id ?? event.id;
        if (id && target.id === PENDING) {
          target.id = id;
          if (state.currentId === sessionId) render();
        }
      } else if (event.type === 'delta') {
        const now = performance.now();
        if (run.firstAt === null) run.firstAt = now;
        run.lastAt = now;
        run.deltas += 1;
        run.text += event.text ?? '';
        target.content = base + run.text;
        if (state.currentId === sessionId) view.streamed(target);
      } else if (event.type === 'done') {
        usage = event.usage ?? null;
        finished = true;
      } else if (event.type === 'error') {
        const problem = typeof event.error === 'object' && event.error ? event.error : event;
        throw new api.ApiError(event.status ?? 500, problem.message || 'The reply failed.', {
          type: problem.type ?? null,
          code: problem.code ?? null,
        });
      }
    }
    if (!finished && !run.stopped) throw new api.ConnectionError();
  } catch (error) {
    if (!(error.name === 'AbortError' && run.stopped)) {
      if (state.currentId === sessionId) showError(error, retry);
      if (!run.started && restore) view.restoreDraft(restore); // never stored: back in the box
    }
  } finally {
    state.streaming = null;
    recordUsage(sessionId, run, usage);
  }
  await settle(sessionId);
}

/** After a reply: the server's view of the session replaces the drawn one, and a queued message goes. */
async function settle(sessionId) {
  try {
    if (state.currentId === sessionId) await reloadCurrent();
    await refreshSessions();
  } catch (error) {
    if (!state.error) showError(error, () => settle(sessionId));
  }
  render();
  if (state.queued) {
    state.queued = false;
    if (!state.error && state.currentId === sessionId) view.sendQueued();
    else render();
  }
}

function recordUsage(sessionId, run, usage) {
  const previous = state.usage.get(sessionId) || {};
  const seconds = run.firstAt !== null && run.lastAt > run.firstAt ? (run.lastAt - run.firstAt) / 1000 : 0;
  const completion = usage?.completion_tokens ?? usage?.generated_tokens ?? null;
  let speed = usage?.tokens_per_second ?? null;
  // The first token's arrival starts the clock, so it is not counted in the rate.
  if (speed === null && seconds > 0.05 && (completion ?? run.deltas) > 1) speed = ((completion ?? run.deltas) - 1) / seconds;
  const prompt = usage?.prompt_tokens ?? null;
  state.usage.set(sessionId, {
    ...previous,
    promptTokens: prompt ?? previous.promptTokens ?? null,
    completionTokens: completion ?? previous.completionTokens ?? null,
    totalTokens: usage?.total_tokens ?? (prompt !== null && completion !== null ? prompt + completion : null),
    tokensPerSecond: speed ?? previous.tokensPerSecond ?? null,
  });
}

function refuseWhileBusy() {
  view.hint('A reply is still being written. Wait for it or press Stop.');
  return false;
}

/** Sends `text` as a user message; returns false (text kept by the caller) when it cannot go now. */
export function send(text) {
  if (busy()) {
    state.queued = true;
    render();
    return false;
  }
  return sendNow(text);
}

async function sendNow(text) {
  view.clearDraft(text);
  let sessionId;
  try {
    sessionId = await ensureSession(text);
  } catch (error) {
    showError(error, () => send(text));
    return true; // the text is shown in the error's Retry; nothing is lost
  }
  const userMessage = { id: 'pending-user', role: 'user', content: text, status: 'complete' };
  const reply = { id: PENDING, role: 'assistant', content: '', status: 'streaming' };
  await stream({
    path: '/messages',
    body: { content: text },
    prepare: (messages) => ({ messages: [...messages, userMessage, reply], target: reply }),
    retry: () => retryAfterSend(sessionId, text),
    restore: text, // refused before it began (too long, say, or no connection): back in the box
  });
  return true;
}

/** Retry after a failed send: answer the stored message if the server kept it, else send it again. */
async function retryAfterSend(sessionId, text) {
  state.error = null;
  let session = null;
  try {
    session = await reloadCurrent();
  } catch (error) {
    showError(error, () => retryAfterSend(sessionId, text));
    return;
  }
  const messages = session?.messages || [];
  const last = messages[messages.length - 1];
  if (last && last.role === 'user' && last.content === text) await regenerate();
  else if (last && last.role === 'assistant' && messages[messages.length - 2]?.content === text) await regenerate();
  else await send(text);
}

export async function regenerate() {
  if (busy()) return refuseWhileBusy();
  const reply = { id: PENDING, role: 'assistant', content: '', status: 'streaming' };
  await stream({
    path: '/regenerate',
    body: {},
    prepare: (messages) => {
      const kept = messages[messages.length - 1]?.role === 'assistant' ? messages.slice(0, -1) : messages;
      return { messages: [...kept, reply], target: reply };
    },
    retry: () => regenerate(),
  });
  return true;
}

export async function continueReply() {
  if (busy()) return refuseWhileBusy();
  await stream({
    path: '/continue',
    body: {},
    prepare: (messages) => {
      const last = messages[messages.length - 1];
      if (last && last.role === 'assistant') {
        const target = { ...last, status: 'streaming' };
        return { messages: [...messages.slice(0, -1), target], target, base: last.content };
      }
      const reply = { id: PENDING, role: 'assistant', content: '', status: 'streaming' };
      return { messages: [...messages, reply], target: reply };
    },
    retry: () => continueReply(),
  });
  return true;
}

export async function editMessage(message, text) {
  if (busy()) return refuseWhileBusy();
  const edited = { ...message, id: 'pending-user', content: text, alternatives: null };
  const reply = { id: PENDING, role: 'assistant', content: '', status: 'streaming' };
  await stream({
    path: `/messages/${encodeURIComponent(message.id)}/edit`,
    body: { content: text },
    prepare: (messages) => {
      const index = messages.findIndex((item) => item.id === message.id);
      const before = index >= 0 ? messages.slice(0, index) : messages;
      return { messages: [...before, edited, reply], target: reply };
    },
    retry: () => editMessage(message, text),
  });
  return true;
}

export async function selectAlternative(messageId) {
  if (busy() || !messageId || !state.currentId) return;
  try {
    await api.json('POST', sessionPath(state.currentId, `/messages/${encodeURIComponent(messageId)}/select`), {});
    await reloadCurrent();
  } catch (error) {
    showError(error, () => selectAlternative(messageId));
  }
}

/** Stop: the server ends the reply and keeps what was written; the page cuts the stream if it lingers. */
export async function stop() {
  const run = state.streaming;
  const sessionId = run ? run.sessionId : state.currentId;
  if (run) run.stopped = true;
  state.queued = false;
  render();
  try {
    await api.json('POST', sessionPath(sessionId, '/stop'), {});
  } catch (error) {
    // Nothing left to stop (it just finished), or the server is unreachable: cut our stream either way.
    if (run) run.controller.abort();
    if (!(error instanceof api.ApiError)) showError(error, null);
  }
  if (run) setTimeout(() => state.streaming === run && run.controller.abort(), STOP_GRACE_MS);
  if (!run) await reloadCurrent().catch(() => {});
}
