// The server's HTTP API: JSON requests with the API key, errors as ApiError, SSE streams as async iterators.
const KEY_STORAGE = 'ember.apiKey';

/** An HTTP error answered by the server, in OpenAI's {"error": {...}} shape when it can be read. */
export class ApiError extends Error {
  constructor(status, message, { type = null, code = null, param = null, retryAfter = null } = {}) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.type = type;
    this.code = code;
    this.param = param;
    this.retryAfter = retryAfter;
  }
}

/** The server could not be reached, or the connection dropped mid-stream. */
export class ConnectionError extends Error {
  constructor(message = 'The connection to the server was lost.') {
    super(message);
    this.name = 'ConnectionError';
  }
}

let memoryKey = ''; // where storage is refused (private mode), the key lives for this page only
let askForKey = null; // async (reason) => key | null, installed by the page
let pendingAsk = null; // one prompt at a time, shared by every request that got a 401

export function onKeyNeeded(callback) {
  askForKey = callback;
}

export function apiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || memoryKey;
  } catch {
    return memoryKey;
  }
}

export function setApiKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // Private mode without storage: the key lives for this page only.
  }
  memoryKey = key;
}

function currentKey() {
  return apiKey();
}

/** Paths are relative to the page, so the page also works behind a path prefix. */
export function url(path) {
  return new URL(path.replace(/^\//, ''), document.baseURI).toString();
}

/** The WebSocket address for `path`; the key is sent as the socket's first message, not in the URL. */
export function websocketUrl(path) {
  const address = new URL(url(path));
  address.protocol = address.protocol === 'https:' ? 'wss:' : 'ws:';
  return address.toString();
}

async function keyFromUser(rejected) {
  if (!askForKey) return null;
  if (!pendingAsk) {
    pendingAsk = Promise.resolve(askForKey(rejected ? 'rejected' : 'needed')).finally(() => {
      pendingAsk = null;
    });
  }
  return pendingAsk;
}

/** fetch with the key; a 401 asks the user for a key (once, shared) and tries again. */
export async function request(method, path, body, { signal, accept } = {}) {
  for (let attempt = 0; ; attempt += 1) {
    const sentKey = currentKey();
    const headers = { Accept: accept || 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (sentKey) headers.Authorization = `Bearer ${sentKey}`;
    let response;
    try {
      response = await fetch(url(path), {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
        cache: 'no-store',
      });
    } catch (error) {
      if (error.name === 'AbortError') throw error;
      throw new ConnectionError('Cannot reach the ember server.');
    }
    if (response.status === 401 && attempt < 5) {
      // Another request may already have stored a fresh key: try that before asking.
      if (currentKey() && currentKey() !== sentKey) continue;
      const key = await keyFromUser(Boolean(sentKey));
      if (key) {
        setApiKey(key);
        continue;
      }
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }
}

export async function errorFrom(response) {
  let message = '';
  let details = {};
  try {
    const text = await response.text();
    try {
      const payload = JSON.parse(text);
      const error = payload.error ?? payload.detail ?? payload;
      if (typeof error === 'string') message = error;
      else if (error && typeof error === 'object') {
        message = typeof error.message === 'string' ? error.message : '';
        details = { type: error.type ?? null, code: error.code ?? null, param: error.param ?? null };
      }
    } catch {
      message = text.slice(0, 300);
    }
  } catch {
    // The body could not be read; the status alone has to do.
  }
  const retryAfter = Number(response.headers.get('Retry-After')) || null;
  return new ApiError(response.status, message || `${response.status} ${response.statusText}`, {
    ...details,
    retryAfter,
  });
}

export async function json(method, path, body, options) {
  const response = await request(method, path, body, options);
  if (response.status === 204) return null;
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

/**
 * The JSON events of a text/event-stream response (`data: {...}` blocks), in order.
 * A JSON (non-stream) answer is yielded as one `done` event, so callers need one path.
 */
export async function* events(response) {
  const type = response.headers.get('Content-Type') || '';
  if (!type.includes('text/event-stream')) {
    const payload = await response.json();
    yield { type: 'done', message: payload.message ?? payload, usage: payload.usage ?? null };
    return;
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (error) {
        if (error.name === 'AbortError') throw error;
        throw new ConnectionError();
      }
      if (chunk.done) break;
      buffer += chunk.value;
      let boundary;
      while ((boundary = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, boundary);
        buffer = buffer.slice(boundary).replace(/^\r?\n\r?\n/, '');
        const event = parseBlock(block);
        if (event === 'end') return;
        if (event) yield event;
      }
    }
    const event = parseBlock(buffer);
    if (event && event !== 'end') yield event;
  } finally {
    reader.releaseLock();
  }
}

function parseBlock(block) {
  let eventName = '';
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
    else if (line.startsWith('event:')) eventName = line.slice(6).trim();
  }
  if (!data.length) return null;
  const text = data.join('\n');
  if (text === '[DONE]') return 'end';
  try {
    const event = JSON.parse(text);
    if (eventName && !event.type) event.type = eventName;
    return event;
  } catch {
    return null;
  }
}
