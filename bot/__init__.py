"""qq-twin: a NoneBot2 plugin that answers QQ chats as your fine-tuned digital twin."""

from nonebot.plugin import PluginMetadata

from bot.admin import admin_usage
from bot.config import Config

__plugin_meta__ = PluginMetadata(
    name="qq-twin",
    description="Answers QQ chats in your own style with a model fine-tuned on your chat history",
    usage=(
        "Talks by itself in private chats and when @-mentioned, quoted or called by name in groups.\n"
        "Superusers:\n" + admin_usage()
    ),
    type="application",
    homepage="https://github.com/qq-twin/qq-twin",
    config=Config,
    supported_adapters={"~onebot.v11"},
)

# This package is both the plugin and a library: `deploy.retrain` imports `bot.store`, `twin
# retrain` imports `bot.config`, without NoneBot initialised, and Python runs this file for every
# such import. NoneBot registers a plugin's matchers by running its package file with
# `__plugin__` set (its PluginLoader does so before executing the module), and the matchers need
# what only an initialised NoneBot has (`get_driver()`, `require`, `get_plugin_config`). So the
# matchers are imported only when NoneBot loads the plugin; every other module stays NoneBot-free.
if "__plugin__" in globals():
    from bot import handlers  # noqa: F401
