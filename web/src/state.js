// The page's one state object; views read it, actions change it and call render().
export const state = {
  sessions: [],
  sessionsLoaded: false,
  query: '',
  currentId: null,
  current: null, // the session as the server last sent it (without messages)
  messages: [], // the active path, as drawn (may hold a reply being streamed)
  streaming: null, // {sessionId, messageId, controller, stopped, firstAt, lastAt, deltas}
  watching: false, // following a reply that another tab (or an earlier page load) is writing
  remote: null, // {sessionId, messageId, text}: that reply, as its WebSocket events tell it
  queued: false, // the composer's text is sent when the current reply ends
  editingId: null,
  renamingId: null,
  error: null, // {title, detail, retry: () => void}
  model: null, // {id, name, contextLength}
  usage: new Map(), // session id -> {promptTokens, completionTokens, tokensPerSecond, estimated}
  connection: 'ok', // 'ok' | 'lost'
};

// Set by main.js: render() redraws everything; streamed() only the reply being written; follow() sticks
// the view to the end of the conversation again.
export const view = {
  render() {},
  streamed() {},
  follow() {},
  hint() {},
  sendQueued() {},
  restoreDraft() {},
  clearDraft() {},
  overlay() {},
};

export function render() {
  view.render();
}
