"""What the serving benchmarks' friends say, one shared list (bench/bot.py, bench/serve_retrain.py)."""

PROMPTS = [
    "在吗",
    "周末去哪玩",
    "今天好累啊",
    "晚上吃什么",
    "你看那个新番了吗",
    "明天几点出发",
    "哈哈哈哈笑死",
    "借我点钱呗",
    "考试考得怎么样",
    "猫又把杯子打翻了",
]
