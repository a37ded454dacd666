// A small Markdown renderer for model answers. It builds DOM nodes with createElement and text nodes
// only, so nothing in the text is ever parsed as HTML: "<script>" or "<img onerror=...>" stay text.
//
// Blocks: paragraphs (single line breaks are kept), headings, bullet and numbered lists (nested by
// indentation), block quotes, horizontal rules and fenced code blocks (a fence that is not closed yet,
// as in the middle of a stream, runs to the end of the text). Inline: `code`, **bold**, *italic*,
// [links](https://...) and bare http(s) URLs; links open in a new tab without a referrer.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})[ \t]+(.*)$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])(\s+)(.*)$/;
const MAX_DEPTH = 8; // nested lists and quotes deeper than this render as plain paragraphs

// Code spans, bold, italic, [text](url) links and bare URLs, in the order they are tried at a position.
// Every span has a bounded length, so a long answer full of unmatched markers renders in linear time.
const INLINE = new RegExp([
  "(`+)([^`]|[^`][\\s\\S]{0,2000}?[^`])\\1(?!`)",              // 1, 2: code span
  "\\*\\*(?=[^\\s*])([\\s\\S]{0,500}?[^\\s*])\\*\\*",              // 3: bold
  "\\*(?=[^\\s*])([\\s\\S]{0,500}?[^\\s*])\\*",                  // 4: italic
  "\\[([^\\]\\n]{1,300})\\]\\(\\s*(https?://[^\\s)]{1,2000})\\s*\\)", // 5, 6: link
  "(https?://[^\\s<>()]{0,2000}[^\\s<>().,;:!?'\"])",             // 7: bare URL
].join("|"), "g");

/** Render `text` as Markdown; returns a DocumentFragment. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  renderBlocks(fragment, String(text).replace(/\r\n?/g, "\n").split("\n"), 0);
  return fragment;
}

/** Append the blocks of `lines` to `parent`. */
function renderBlocks(parent, lines, depth) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i += 1;
    } else if (FENCE.test(line)) {
      i = codeBlock(parent, lines, i);
    } else if (HEADING.test(line)) {
      i = heading(parent, lines, i);
    } else if (RULE.test(line)) {
      parent.appendChild(document.createElement("hr"));
      i += 1;
    } else if (depth < MAX_DEPTH && QUOTE.test(line)) {
      i = quote(parent, lines, i, depth);
    } else if (depth < MAX_DEPTH && listItem(line)) {
      i = list(parent, lines, i, depth);
    } else {
      i = paragraph(parent, lines, i);
    }
  }
}

/** Whether `line` starts a block other than a paragraph (it ends a paragraph). */
function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || listItem(line) !== null;
}

/** A list item line: its kind, number, text and the indentation its continuation lines need. */
function listItem(line) {
  const m = ITEM.exec(line);
  if (!m || m[1].length > 3 || !m[4].trim()) return null;
  const ordered = /\d/.test(m[2]);
  return {
    ordered,
    start: ordered ? parseInt(m[2], 10) : 1,
    indent: m[1].length,
    contentIndent: m[1].length + m[2].length + Math.min(m[3].length, 4),
    text: m[4],
  };
}

function indentOf(line) {
  return line.length - line.trimStart().length;
}

/** A fenced code block from lines[i]; returns the index after it. */
function codeBlock(parent, lines, i) {
  const open = FENCE.exec(lines[i]);
  const marker = open[1];
  const body = [];
  let j = i + 1;
  let closed = false;
  while (j < lines.length && !closed) {
    const close = lines[j].trim();
    closed = close.startsWith(marker[0].repeat(marker.length)) && /^([`~])\1*$/.test(close);
    if (!closed) body.push(lines[j]);
    j += 1;
  }
  if (!closed && body.length && !body[body.length - 1]) body.pop(); // mid-stream: no empty last line
  const pre = document.createElement("pre");
  const code = document.createElement("code");
  if (open[2]) {
    code.className = "language-" + open[2];
    pre.dataset.lang = open[2];
  }
  code.textContent = body.join("\n");
  pre.appendChild(code);
  parent.appendChild(pre);
  return j;
}

/** An ATX heading ("# Title"): levels 1-6 become h3-h6 under the page's own headings. */
function heading(parent, lines, i) {
  const m = HEADING.exec(lines[i]);
  const el = document.createElement("h" + Math.min(m[1].length + 2, 6));
  appendInline(el, withoutClosingHashes(m[2].trim()));
  parent.appendChild(el);
  return i + 1;
}

/** "Title ##" -> "Title" (a closing run of # after a space is decoration). */
function withoutClosingHashes(text) {
  let end = text.length;
  while (end > 0 && text[end - 1] === "#") end -= 1;
  if (end === text.length || (end > 0 && text[end - 1] !== " " && text[end - 1] !== "\t")) return text;
  return text.slice(0, end).trimEnd();
}

/** Consecutive "> " lines, rendered as blocks inside a blockquote. */
function quote(parent, lines, i, depth) {
  const inner = [];
  let j = i;
  while (j < lines.length && QUOTE.test(lines[j])) {
    inner.push(QUOTE.exec(lines[j])[1]);
    j += 1;
  }
  const el = document.createElement("blockquote");
  renderBlocks(el, inner, depth + 1);
  parent.appendChild(el);
  return j;
}

/** A list starting at lines[i]: items of the same kind, each with its indented continuation lines. */
function list(parent, lines, i, depth) {
  const first = listItem(lines[i]);
  const el = document.createElement(first.ordered ? "ol" : "ul");
  if (first.ordered && first.start !== 1) el.start = first.start;
  let j = i;
  while (j < lines.length) {
    const item = listItem(lines[j]);
    if (!item || item.ordered !== first.ordered || item.indent >= first.contentIndent) break;
    const body = [item.text];
    j += 1;
    while (j < lines.length) {
      const next = lines[j];
      if (!next.trim()) {
        const k = nextNonBlank(lines, j);
        if (k < lines.length && indentOf(lines[k]) >= item.contentIndent) {
          body.push("");
          j += 1;
          continue;
        }
        break;
      }
      if (indentOf(next) >= item.contentIndent) {
        body.push(next.slice(item.contentIndent));
      } else if (listItem(next) || startsBlock(next)) {
        break;
      } else {
        body.push(next.trim()); // a lazy continuation of the item's text
      }
      j += 1;
    }
    const li = document.createElement("li");
    renderBlocks(li, body, depth + 1);
    el.appendChild(li);
    // Blank lines between two items of the same list keep the list going.
    const k = nextNonBlank(lines, j);
    const after = k < lines.length ? listItem(lines[k]) : null;
    if (k > j && after && after.ordered === first.ordered && after.indent < first.contentIndent) j = k;
  }
  parent.appendChild(el);
  return j;
}

function nextNonBlank(lines, j) {
  let k = j;
  while (k < lines.length && !lines[k].trim()) k += 1;
  return k;
}

/** Lines up to a blank line or the start of another block, as one paragraph. */
function paragraph(parent, lines, i) {
  const text = [lines[i].trim()];
  let j = i + 1;
  while (j < lines.length && lines[j].trim() && !startsBlock(lines[j])) {
    text.push(lines[j].trim());
    j += 1;
  }
  const p = document.createElement("p");
  appendInline(p, text.join("\n"));
  parent.appendChild(p);
  return j;
}

/** Append `text` with its inline Markdown to `parent`. */
export function appendInline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) { // matchAll works on a copy: safe to recurse
    appendText(parent, text.slice(last, m.index));
    last = m.index + m[0].length;
    if (m[2] !== undefined) {
      const code = document.createElement("code");
      code.textContent = m[2].length > 2 && m[2].startsWith(" ") && m[2].endsWith(" ") ? m[2].slice(1, -1) : m[2];
      parent.appendChild(code);
    } else if (m[3] !== undefined) {
      parent.appendChild(nested("strong", m[3]));
    } else if (m[4] !== undefined) {
      parent.appendChild(nested("em", m[4]));
    } else if (m[5] !== undefined) {
      parent.appendChild(link(m[6], m[5]));
    } else {
      parent.appendChild(link(m[7], m[7]));
    }
  }
  appendText(parent, text.slice(last));
}

function nested(tag, text) {
  const el = document.createElement(tag);
  appendInline(el, text);
  return el;
}

/** An external link for an http(s) URL; anything else stays text. */
function link(href, label) {
  let url = null;
  try {
    url = new URL(href);
  } catch {
    url = null;
  }
  if (!url || (url.protocol !== "http:" && url.protocol !== "https:")) {
    return document.createTextNode(label);
  }
  const a = document.createElement("a");
  a.href = url.href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  a.textContent = label;
  return a;
}

/** Text with its line breaks as <br> elements. */
function appendText(parent, text) {
  if (!text) return;
  const parts = text.split("\n");
  parts.forEach((part, index) => {
    if (index > 0) parent.appendChild(document.createElement("br"));
    if (part) parent.appendChild(document.createTextNode(part));
  });
}
