// Markdown to safe DOM: markdown-it with raw HTML off, then DOMPurify, links made safe, code blocks copyable.
import DOMPurify from 'dompurify';
import hljs from 'highlight.js/lib/core';
import bash from 'highlight.js/lib/languages/bash';
import c from 'highlight.js/lib/languages/c';
import cpp from 'highlight.js/lib/languages/cpp';
import css from 'highlight.js/lib/languages/css';
import diff from 'highlight.js/lib/languages/diff';
import go from 'highlight.js/lib/languages/go';
import java from 'highlight.js/lib/languages/java';
import javascript from 'highlight.js/lib/languages/javascript';
import jsonLanguage from 'highlight.js/lib/languages/json';
import markdownLanguage from 'highlight.js/lib/languages/markdown';
import python from 'highlight.js/lib/languages/python';
import rust from 'highlight.js/lib/languages/rust';
import sql from 'highlight.js/lib/languages/sql';
import typescript from 'highlight.js/lib/languages/typescript';
import xml from 'highlight.js/lib/languages/xml';
import yaml from 'highlight.js/lib/languages/yaml';
import MarkdownIt from 'markdown-it';

import { h } from './dom.js';
import { icon } from './icons.js';

const languages = {
  bash, c, cpp, css, diff, go, java, javascript, json: jsonLanguage, markdown: markdownLanguage,
  python, rust, sql, typescript, xml, yaml,
};
for (const [name, language] of Object.entries(languages)) hljs.registerLanguage(name, language);

const markdown = new MarkdownIt({
  html: false, // raw HTML in a message is shown as text
  linkify: true,
  breaks: false,
  highlight(code, language) {
    if (language && hljs.getLanguage(language)) {
      try {
        return hljs.highlight(code, { language, ignoreIllegals: true }).value;
      } catch {
        return '';
      }
    }
    return '';
  },
});

// Images would fetch from anywhere: show them as links instead (the page makes no outside requests).
markdown.renderer.rules.image = (tokens, index) => {
  const token = tokens[index];
  const source = markdown.utils.escapeHtml(token.attrGet('src') || '');
  const alt = markdown.utils.escapeHtml(token.content || 'image');
  return `<a href="${source}">${alt}</a>`;
};

const SAFE_LINK = /^(https?:|mailto:)/i;

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A') {
    const href = node.getAttribute('href') || '';
    if (SAFE_LINK.test(href.trim())) {
      node.setAttribute('target', '_blank');
      node.setAttribute('rel', 'noopener noreferrer');
    } else {
      node.removeAttribute('href');
    }
  }
  // Table alignment arrives as inline style, which the page's policy refuses: keep it as a class.
  const align = node.getAttribute && node.getAttribute('style');
  if (align) {
    const match = /text-align:\s*(left|right|center)/.exec(align);
    node.removeAttribute('style');
    if (match) node.classList.add(`align-${match[1]}`);
  }
});

const PURIFY = {
  RETURN_DOM_FRAGMENT: true,
  FORBID_TAGS: ['style', 'img', 'svg', 'math', 'form', 'input', 'button', 'textarea', 'select', 'iframe'],
  FORBID_ATTR: ['id', 'name'],
  ALLOW_DATA_ATTR: false,
};

/** Markdown text -> a sanitized DocumentFragment; code blocks get a header with a Copy button. */
export function renderMarkdown(text, { onCopy } = {}) {
  const fragment = DOMPurify.sanitize(markdown.render(text), PURIFY);
  for (const pre of fragment.querySelectorAll('pre')) {
    const code = pre.querySelector('code');
    const language = code ? (/language-([\w+-]+)/.exec(code.className) || [])[1] : '';
    const copy = h(
      'button',
      { type: 'button', class: 'code-copy', 'aria-label': 'Copy', title: 'Copy code' },
      icon('copy'),
      h('span', { class: 'code-copy-label' }, 'Copy'),
    );
    copy.addEventListener('click', () => onCopy && onCopy((code || pre).textContent, copy));
    const block = h(
      'div',
      { class: 'code-block' },
      h('div', { class: 'code-header' }, h('span', { class: 'code-language' }, language || 'text'), copy),
    );
    pre.replaceWith(block);
    block.append(pre);
  }
  return fragment;
}
