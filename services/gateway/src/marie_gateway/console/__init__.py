"""The web console (web/, built into web/dist), served at `/`."""
