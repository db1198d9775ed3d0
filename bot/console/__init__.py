"""The operator console: a password-protected web page served by the bot itself at /twin/console/.

`app.mount` puts it on the NoneBot FastAPI driver's server (bot/handlers.py does, when
`TWIN_CONSOLE` is true); `pages/` holds one module per page. Everything it changes goes through
the admin verbs of `bot/admin.py`, the same path as `/twin …` in chat. docs/console.md.
"""
