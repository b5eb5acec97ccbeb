import { render } from "@testing-library/react";
import { afterEach, describe, expect, it } from "vitest";
import { Highlighted } from "./Highlight";
import { Markdown } from "./Markdown";
import { splitMarks } from "./marks";

declare global {
  interface Window {
    pwned?: boolean;
  }
}

afterEach(() => {
  delete window.pwned;
});

describe("search highlights", () => {
  it("splits a snippet into marked and plain parts", () => {
    expect(splitMarks("a <mark>tea</mark> and <mark>cake</mark>!")).toEqual([
      { text: "a ", marked: false },
      { text: "tea", marked: true },
      { text: " and ", marked: false },
      { text: "cake", marked: true },
      { text: "!", marked: false },
    ]);
  });

  it("renders <mark> as highlights and any other HTML as text that does not run", () => {
    const snippet =
      '<script>window.pwned = true</script> my <mark>tea</mark> <img src=x onerror="window.pwned = true"> <b>bold</b>';
    const { container } = render(<Highlighted snippet={snippet} />);
    expect([...container.querySelectorAll("mark")].map((m) => m.textContent)).toEqual(["tea"]);
    expect(container.querySelector("script, img, b")).toBeNull();
    expect(container.textContent).toContain("<script>window.pwned = true</script>");
    expect(container.textContent).toContain("<img src=x");
    expect(window.pwned).toBeUndefined();
  });

  it("decodes the escaped snippet into text, never into elements", () => {
    // The memory service's format: html.escape()d text with <mark> tags.
    const snippet =
      "&lt;script&gt;window.pwned = true&lt;/script&gt; &amp; <mark>t&#x27;ea</mark> &lt;img src=x onerror=&quot;window.pwned = true&quot;&gt;";
    const { container } = render(<Highlighted snippet={snippet} />);
    expect([...container.querySelectorAll("mark")].map((m) => m.textContent)).toEqual(["t'ea"]);
    expect(container.querySelector("script, img")).toBeNull();
    expect(container.textContent).toBe(
      '<script>window.pwned = true</script> & t\'ea <img src=x onerror="window.pwned = true">',
    );
    expect(window.pwned).toBeUndefined();
  });

  it("does not take a mark tag with attributes as a highlight", () => {
    const { container } = render(<Highlighted snippet={'<mark onclick="x()">a</mark>'} />);
    expect(container.querySelector("[onclick]")).toBeNull();
  });
});

describe("a model's answer as Markdown", () => {
  it("renders Markdown with code blocks", () => {
    const { container } = render(<Markdown text={"# Title\n\nSome **bold**.\n\n```python\nprint('hi')\n```\n"} />);
    expect(container.querySelector("h1")?.textContent).toBe("Title");
    expect(container.querySelector("strong")?.textContent).toBe("bold");
    expect(container.querySelector("pre code")?.textContent).toBe("print('hi')\n");
  });

  it("renders no HTML from the answer: no script, no image, no handler", () => {
    const text =
      'Hi <script>window.pwned = true</script>\n\n<img src=x onerror="window.pwned = true">\n\n![x](javascript:alert(1)) [link](javascript:window.pwned=true)';
    const { container } = render(<Markdown text={text} />);
    expect(container.querySelector("script, img, [onerror]")).toBeNull();
    const link = container.querySelector("a");
    expect(link?.getAttribute("href") ?? "").not.toMatch(/^javascript:/i);
    expect(window.pwned).toBeUndefined();
  });
});
