"""qq-twin: a NoneBot2 plugin that answers QQ chats as your fine-tuned digital twin."""

from nonebot.plugin import PluginMetadata

from bot.config import Config

__plugin_meta__ = PluginMetadata(
    name="qq-twin",
    description="Answers QQ chats in your own style with a model fine-tuned on your chat history",
    usage=(
        "Talks by itself in private chats and when @-mentioned, quoted or called by name in groups.\n"
        "Superusers: /twin status | pause | resume | reset | prob <0..1> | model [version] | retrain"
        " | block <uin> | unblock <uin> | approve (quoting a twin reply: train on it)"
    ),
    type="application",
    homepage="https://github.com/qq-twin/qq-twin",
    config=Config,
    supported_adapters={"~onebot.v11"},
)

# NoneBot sets `__plugin__` before running this file when it loads the package as a plugin.
# Only then are the matchers registered: `deploy.retrain` imports `bot.store` without NoneBot
# initialised, and matchers, `get_driver()` and `get_plugin_config()` would fail there.
if "__plugin__" in globals():
    from bot import handlers  # noqa: F401
