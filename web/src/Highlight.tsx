import { splitMarks } from "./marks";

/** A search snippet: its `<mark>` parts highlighted, the rest as text (never as HTML). */
export function Highlighted({ snippet }: { snippet: string }) {
  return (
    <span>
      {splitMarks(snippet).map((part, i) =>
        part.marked ? <mark key={i}>{part.text}</mark> : <span key={i}>{part.text}</span>,
      )}
    </span>
  );
}
