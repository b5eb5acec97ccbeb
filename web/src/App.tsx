import {
  ActionIcon,
  Burger,
  Button,
  Group,
  NavLink,
  Title,
  useComputedColorScheme,
  useMantineColorScheme,
} from "@mantine/core";
import { useDisclosure } from "@mantine/hooks";
import { useEffect, useMemo, useState } from "react";
import { Api, storedKey, storeKey } from "./api";
import { ChatPage } from "./pages/Chat";
import { ComparePage } from "./pages/Compare";
import { KeysPage } from "./pages/Keys";
import { MemoriesPage } from "./pages/Memories";
import { SignIn } from "./pages/SignIn";
import { UsagePage } from "./pages/Usage";

const PAGES = [
  { id: "chat", label: "Chat" },
  { id: "compare", label: "Compare" },
  { id: "memories", label: "Memories" },
  { id: "keys", label: "Keys (admin)" },
  { id: "usage", label: "Usage (admin)" },
] as const;
type PageId = (typeof PAGES)[number]["id"];

function pageFromHash(): PageId {
  const id = window.location.hash.replace(/^#\/?/, "");
  return PAGES.find((p) => p.id === id)?.id ?? "chat";
}

function ThemeToggle() {
  // keepTransitions: switching must not inject a <style> (the CSP refuses inline styles).
  const { setColorScheme } = useMantineColorScheme({ keepTransitions: true });
  const scheme = useComputedColorScheme("light");
  const next = scheme === "dark" ? "light" : "dark";
  return (
    <ActionIcon
      variant="default"
      size="lg"
      onClick={() => setColorScheme(next)}
      aria-label={`Switch to ${next} theme`}
      title={`Switch to ${next} theme`}
    >
      {scheme === "dark" ? "☀" : "☾"}
    </ActionIcon>
  );
}

export function App() {
  const [key, setKey] = useState<string | null>(() => storedKey());
  const [page, setPage] = useState<PageId>(pageFromHash);
  const [opened, { toggle, close }] = useDisclosure();
  const api = useMemo(() => (key ? new Api(key) : null), [key]);

  useEffect(() => {
    const onHash = () => setPage(pageFromHash());
    window.addEventListener("hashchange", onHash);
    return () => window.removeEventListener("hashchange", onHash);
  }, []);

  if (api === null) {
    return (
      <SignIn
        onSignedIn={(k) => {
          storeKey(k);
          setKey(k);
        }}
        themeToggle={<ThemeToggle />}
      />
    );
  }

  const signOut = () => {
    storeKey(null);
    setKey(null);
  };

  return (
    // A plain CSS grid rather than Mantine's AppShell, whose responsive
    // layout is an injected <style> that the CSP (style-src 'self') refuses.
    <div className="shell">
      <header className="shell-header">
        <Group h="100%" px="md" justify="space-between" wrap="nowrap">
          <Group gap="sm" wrap="nowrap">
            <Burger
              opened={opened}
              onClick={toggle}
              hiddenFrom="sm"
              size="sm"
              aria-label="Menu"
              aria-expanded={opened}
            />
            <Title order={1} size="h3">
              Marie
            </Title>
          </Group>
          <Group gap="xs" wrap="nowrap">
            <ThemeToggle />
            <Button variant="default" onClick={signOut}>
              Sign out
            </Button>
          </Group>
        </Group>
      </header>
      <nav className="shell-nav" data-open={opened || undefined} aria-label="Pages">
        {PAGES.map((p) => (
          <NavLink
            key={p.id}
            href={`#/${p.id}`}
            label={p.label}
            active={p.id === page}
            aria-current={p.id === page ? "page" : undefined}
            onClick={close}
          />
        ))}
      </nav>
      <main className="shell-main">
        {page === "chat" && <ChatPage api={api} />}
        {page === "compare" && <ComparePage api={api} />}
        {page === "memories" && <MemoriesPage api={api} />}
        {page === "keys" && <KeysPage api={api} />}
        {page === "usage" && <UsagePage api={api} />}
      </main>
    </div>
  );
}
