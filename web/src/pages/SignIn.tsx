import { Alert, Button, Center, Group, Paper, PasswordInput, Stack, Text, Title } from "@mantine/core";
import { type FormEvent, type ReactNode, useState } from "react";
import { Api, ApiError } from "../api";

interface Props {
  onSignedIn: (key: string) => void;
  themeToggle: ReactNode;
}

/** Sign in with an API key; the gateway checks it before the console keeps it. */
export function SignIn({ onSignedIn, themeToggle }: Props) {
  const [key, setKey] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    const trimmed = key.trim();
    if (!trimmed) {
      setError("Enter an API key.");
      return;
    }
    setBusy(true);
    setError(null);
    try {
      // Any valid key may read its own usage: a cheap check of the key.
      await new Api(trimmed).get("/api/usage");
      onSignedIn(trimmed);
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 401) {
        setError("That API key is not valid (unknown, revoked or expired).");
      } else {
        setError(exc instanceof Error ? exc.message : String(exc));
      }
    } finally {
      setBusy(false);
    }
  };

  return (
    <Center mih="100dvh" p="md">
      <Paper withBorder shadow="sm" p="lg" w="100%" maw={420}>
        <form onSubmit={(e) => void submit(e)} aria-label="Sign in">
          <Stack>
            <Group justify="space-between">
              <Title order={2}>Marie</Title>
              {themeToggle}
            </Group>
            <Text size="sm" c="dimmed">
              Sign in with an API key (`marie keys create`). It is kept in this tab only.
            </Text>
            <PasswordInput
              label="API key"
              value={key}
              onChange={(e) => setKey(e.currentTarget.value)}
              autoComplete="off"
              data-autofocus
              autoFocus
            />
            {error && (
              <Alert color="red" role="alert">
                {error}
              </Alert>
            )}
            <Button type="submit" loading={busy}>
              Sign in
            </Button>
          </Stack>
        </form>
      </Paper>
    </Center>
  );
}
