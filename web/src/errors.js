// Turns a failure into what the conversation shows: a short title, the server's detail, whether Retry makes sense.
import { ApiError, ConnectionError } from './api.js';

/** The server's detail as a sentence: a capital first letter and a full stop. */
function sentence(text) {
  const trimmed = (text || '').trim();
  if (!trimmed) return '';
  const capital = trimmed[0].toUpperCase() + trimmed.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}

export function describeError(error) {
  if (error instanceof ConnectionError) {
    return {
      title: 'Connection lost',
      detail: 'ember is trying to reconnect. Anything already written is kept on the server.',
      connection: true,
    };
  }
  if (!(error instanceof ApiError)) {
    return { title: 'Something went wrong', detail: error && error.message ? error.message : String(error) };
  }
  const message = error.message || '';
  const code = `${error.code || ''} ${error.type || ''}`;
  if (error.status === 401) {
    return { title: 'API key needed', detail: 'The server did not accept this page’s API key. Retry to enter it.' };
  }
  if (error.status === 409) {
    return {
      title: 'This chat is busy',
      detail: 'A reply is still being written in this chat (perhaps in another tab). Wait for it or press Stop.',
    };
  }
  if (/context|too long|exceed/i.test(code) || (error.status === 400 && /context/i.test(message))) {
    return {
      title: 'Too long for the model’s context',
      detail: `${sentence(message)} Shorten the message, or start a new chat.`,
      context: true,
    };
  }
  if (error.status === 503 || error.status === 429) {
    const wait = error.retryAfter ? ` Try again in about ${error.retryAfter} s.` : ' Try again in a moment.';
    return { title: 'The server is busy', detail: `${sentence(message)}${wait}`.trim() };
  }
  if (error.status === 404) return { title: 'Not found', detail: sentence(message) || 'This chat no longer exists.' };
  if (error.status === 413) return { title: 'Message too large', detail: sentence(message) };
  if (error.status >= 500) return { title: 'The server had a problem', detail: sentence(message) };
  return { title: 'The request was refused', detail: sentence(message) };
}
