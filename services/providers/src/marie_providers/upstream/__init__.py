"""What every upstream kind shares: Provider, HttpProvider, transport, stream readers, chunks."""
