/**
 * Search snippets carry `<mark>…</mark>` around the matches, the rest
 * HTML-escaped (the memory service's format). They are shown as highlights,
 * and everything else as plain text, entities decoded: the snippet quotes
 * messages, which may hold any HTML (a model's answer is untrusted), and none
 * of it is ever parsed as HTML.
 */

const NAMED: Record<string, string> = { amp: "&", lt: "<", gt: ">", quot: '"', apos: "'" };

/** `&lt;b&gt;` → `<b>`, as text: the entities html.escape (and OpenSearch) write, and numeric ones. */
export function decodeEntities(text: string): string {
  return text.replace(/&(#x[0-9a-f]+|#[0-9]+|[a-z]+);/gi, (whole, name: string) => {
    if (name[0] === "#") {
      const code = name[1] === "x" || name[1] === "X" ? parseInt(name.slice(2), 16) : parseInt(name.slice(1), 10);
      return code > 0 && code <= 0x10ffff ? String.fromCodePoint(code) : whole;
    }
    return NAMED[name.toLowerCase()] ?? whole;
  });
}

export interface Part {
  text: string;
  marked: boolean;
}

/** The snippet split into plain and marked parts; only the exact `<mark>`/`</mark>` tags count. */
export function splitMarks(snippet: string): Part[] {
  const parts: Part[] = [];
  let marked = false;
  for (const piece of snippet.split(/(<mark>|<\/mark>)/)) {
    if (piece === "<mark>") marked = true;
    else if (piece === "</mark>") marked = false;
    else if (piece) parts.push({ text: decodeEntities(piece), marked });
  }
  return parts;
}
