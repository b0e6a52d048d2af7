"""Domains: health, accounts, backups and audit; each is a Litestar plugin."""
