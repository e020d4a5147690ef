// Inline SVG icons (static, trusted markup): 20x20 strokes that take the text colour.
const paths = {
  plus: '<path d="M10 4v12M4 10h12"/>',
  menu: '<path d="M3.5 6h13M3.5 10h13M3.5 14h13"/>',
  close: '<path d="M5 5l10 10M15 5L5 15"/>',
  settings:
    '<circle cx="10" cy="10" r="2.6"/><path d="M10 2.5v2M10 15.5v2M2.5 10h2M15.5 10h2M4.7 4.7l1.4 1.4M13.9 13.9l1.4 1.4M4.7 15.3l1.4-1.4M13.9 6.1l1.4-1.4"/>',
  send: '<path d="M10 16V4M5 9l5-5 5 5"/>',
  stop: '<rect x="5.5" y="5.5" width="9" height="9" rx="1.5" fill="currentColor" stroke="none"/>',
  copy: '<rect x="7" y="7" width="9.5" height="9.5" rx="2"/><path d="M13 7V5.5A2 2 0 0 0 11 3.5H5.5a2 2 0 0 0-2 2V11a2 2 0 0 0 2 2H7"/>',
  check: '<path d="M4.5 10.5l3.5 3.5 7.5-8"/>',
  edit: '<path d="M12.8 3.7l3.5 3.5-8.8 8.8H4v-3.5z"/><path d="M11 5.5l3.5 3.5"/>',
  regenerate: '<path d="M16 10a6 6 0 1 1-1.8-4.3"/><path d="M16 3.5v3.2h-3.2"/>',
  continue: '<path d="M4 10h10M10.5 6l4 4-4 4"/>',
  rename: '<path d="M3.5 16.5h13"/><path d="M12.5 3.5l3 3-7.5 7.5h-3v-3z"/>',
  trash: '<path d="M4 6h12M8 6V4.5h4V6M6 6l.7 10h6.6L14 6"/>',
  left: '<path d="M12 5l-5 5 5 5"/>',
  right: '<path d="M8 5l5 5-5 5"/>',
  warning: '<path d="M10 3l7.5 13h-15z"/><path d="M10 8v3.5M10 14v.01"/>',
  retry: '<path d="M4 10a6 6 0 1 0 1.8-4.3"/><path d="M4 3.5v3.2h3.2"/>',
  key: '<circle cx="7" cy="12.5" r="3.5"/><path d="M9.5 10l6-6M13.5 6l2 2"/>',
  down: '<path d="M10 4v12M5 11l5 5 5-5"/>',
};

export function icon(name) {
  const span = document.createElement('span');
  span.className = 'icon';
  span.setAttribute('aria-hidden', 'true');
  span.innerHTML =
    '<svg viewBox="0 0 20 20" width="20" height="20" fill="none" stroke="currentColor" stroke-width="1.6" ' +
    `stroke-linecap="round" stroke-linejoin="round">${paths[name]}</svg>`;
  return span;
}
