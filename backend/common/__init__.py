"""The shared foundation every layer may use: settings (config), paths, logging,
redaction of secrets, the secrets box. Imports nothing else of `backend`."""
