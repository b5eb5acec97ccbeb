/**
 * Search snippets carry `<mark>…</mark>` around the matches. They are shown as
 * highlights, and everything else in the snippet as plain text: the snippet
 * quotes messages, which may hold any HTML (a model's answer is untrusted).
 */

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
    else if (piece) parts.push({ text: piece, marked });
  }
  return parts;
}
