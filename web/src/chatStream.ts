/** What a conversation turn's SSE events say, folded into one answer. */

export interface Answer {
  text: string;
  model: string | null;
  error: string | null;
  messageId: string | null;
  done: boolean;
}

export const EMPTY_ANSWER: Answer = { text: "", model: null, error: null, messageId: null, done: false };

interface ChunkEvent {
  object?: string;
  id?: string;
  model?: string;
  choices?: { delta?: { content?: string | null } }[];
  error?: { message?: string };
}

/** The answer after one more event (a chunk, the stored message's id, or an error). */
export function applyEvent(answer: Answer, data: unknown): Answer {
  const ev = data as ChunkEvent;
  if (ev.error) return { ...answer, error: ev.error.message ?? "The answer failed." };
  if (ev.object === "conversation.message") return { ...answer, messageId: ev.id ?? null };
  const piece = ev.choices?.[0]?.delta?.content ?? "";
  return { ...answer, text: answer.text + piece, model: ev.model ?? answer.model };
}
