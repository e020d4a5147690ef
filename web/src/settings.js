// The Settings dialog: a session's system prompt and sampling settings, validated before they are sent.
import { h } from './dom.js';
import { modal } from './dialogs.js';

// Defaults match ember's SamplingParams; ranges match what the server accepts.
export const FIELDS = [
  { name: 'temperature', label: 'Temperature', step: '0.05', min: 0, max: 2, fallback: 0.8, hint: '0 always picks the likeliest token' },
  { name: 'top_p', label: 'Top-p', step: '0.01', min: 0.01, max: 1, fallback: 0.95, hint: 'Nucleus sampling; 1 turns it off' },
  { name: 'top_k', label: 'Top-k', step: '1', min: 0, max: 1000, fallback: 40, integer: true, hint: '0 turns it off' },
  { name: 'min_p', label: 'Min-p', step: '0.01', min: 0, max: 0.99, fallback: 0.05, hint: '0 turns it off' },
  { name: 'max_tokens', label: 'Max tokens', step: '1', min: 1, max: 1000000, fallback: 256, integer: true, hint: 'Longest reply' },
  { name: 'repetition_penalty', label: 'Repetition penalty', step: '0.05', min: 0.05, max: 4, fallback: 1, hint: '1 turns it off' },
  { name: 'seed', label: 'Seed', step: '1', min: 0, max: 2 ** 53, integer: true, optional: true, hint: 'Empty: a new draw each time' },
];

/**
 * Opens the dialog for `values` ({system_prompt, settings}); `save(changes)` is awaited and may throw
 * an error whose message is shown in the dialog. Resolves once the dialog closes.
 */
export function openSettings({ values, scopeText, about, onForgetKey, onExport, save }) {
  const box = modal('Settings', 'settings');
  const form = h('form', { class: 'dialog-panel', novalidate: true });
  const settings = values.settings || {};
  const system = h('textarea', {
    class: 'text-input',
    id: 'setting-system',
    rows: '3',
    placeholder: 'You are a helpful assistant.',
  });
  system.value = values.system_prompt || '';
  const inputs = {};
  const grid = h('div', { class: 'settings-grid' });
  for (const field of FIELDS) {
    const input = h('input', {
      class: 'text-input',
      id: `setting-${field.name}`,
      type: 'number',
      inputmode: field.integer ? 'numeric' : 'decimal',
      step: field.step,
      min: String(field.min),
      max: String(field.max),
      placeholder: field.optional ? 'Random' : String(field.fallback),
    });
    const value = settings[field.name];
    input.value = value === undefined || value === null ? (field.optional ? '' : String(field.fallback)) : String(value);
    inputs[field.name] = input;
    grid.append(
      h(
        'div',
        { class: 'field' },
        h('label', { class: 'field-label', for: input.id }, field.label),
        input,
        h('span', { class: 'field-hint' }, field.hint),
      ),
    );
  }
  const error = h('p', { class: 'form-error', role: 'alert' });
  const saveButton = h('button', { type: 'submit', class: 'button primary' }, 'Save');
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.textContent = '';
    const changes = { system_prompt: system.value.trim() || null, settings: {} };
    for (const field of FIELDS) {
      const text = inputs[field.name].value.trim();
      if (!text) {
        if (field.optional) changes.settings[field.name] = null;
        else {
          error.textContent = `${field.label} needs a value.`;
          inputs[field.name].focus();
          return;
        }
        continue;
      }
      const number = Number(text);
      const bad = !Number.isFinite(number) || number < field.min || number > field.max || (field.integer && !Number.isInteger(number));
      if (bad) {
        error.textContent = `${field.label} must be ${field.integer ? 'a whole number ' : ''}between ${field.min} and ${field.max}.`;
        inputs[field.name].focus();
        return;
      }
      changes.settings[field.name] = number;
    }
    saveButton.disabled = true;
    try {
      await save(changes);
      box.close(true);
    } catch (problem) {
      error.textContent = problem.message || String(problem);
    } finally {
      saveButton.disabled = false;
    }
  });
  const aboutRows = h('dl', { class: 'about' });
  for (const [term, detail] of about) aboutRows.append(h('div', {}, h('dt', {}, term), h('dd', {}, detail)));
  const exportRow = onExport
    ? h(
        'div',
        { class: 'export-row' },
        h('span', { class: 'field-label' }, 'Export this chat'),
        h('button', { type: 'button', class: 'button secondary small', onclick: () => onExport('markdown') }, 'Markdown'),
        h('button', { type: 'button', class: 'button secondary small', onclick: () => onExport('json') }, 'JSON'),
      )
    : null;
  form.append(
    box.title,
    h('p', { class: 'dialog-text' }, scopeText),
    h('div', { class: 'field wide' }, h('label', { class: 'field-label', for: 'setting-system' }, 'System prompt'), system),
    grid,
    aboutRows,
    exportRow,
    error,
    h(
      'div',
      { class: 'dialog-actions' },
      onForgetKey
        ? h('button', { type: 'button', class: 'button ghost', onclick: () => { onForgetKey(); box.close(null); } }, 'Forget API key')
        : null,
      h('span', { class: 'spacer' }),
      h('button', { type: 'button', class: 'button secondary', onclick: () => box.close(null) }, 'Cancel'),
      saveButton,
    ),
  );
  box.dialog.append(form);
  const opened = box.open();
  system.focus();
  return opened;
}
