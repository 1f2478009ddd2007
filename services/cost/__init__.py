"""The cost service: price books, the exact idempotent cost ledger, session budgets.

Modules: `pricing` (the domain and its exact arithmetic), `store` (all SQL),
`servicer` (the RPCs), `server` (wiring), `config` (settings); the default
price book is `pricebook.toml`.
"""
