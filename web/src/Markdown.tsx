import ReactMarkdown from "react-markdown";
import remarkGfm from "remark-gfm";

/**
 * A model's answer as Markdown. Raw HTML in it is shown as text, never
 * parsed (react-markdown without rehype-raw), and links only open with safe
 * protocols: the answer is untrusted.
 */
export function Markdown({ text }: { text: string }) {
  return (
    <div className="markdown">
      <ReactMarkdown
        remarkPlugins={[remarkGfm]}
        skipHtml={false}
        components={{
          a: ({ href, children }) => (
            <a href={href} target="_blank" rel="noopener noreferrer nofollow">
              {children}
            </a>
          ),
          // No remote images: the page's CSP refuses them, so say where they were.
          img: ({ alt, src }) => <span className="image-ref">[image: {alt || src}]</span>,
        }}
      >
        {text}
      </ReactMarkdown>
    </div>
  );
}
