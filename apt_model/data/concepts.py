"""The built-in concept table behind HLBD Full.

Each concept is written out at all eight HLBD levels (see ``shared/spec/hlbd.md``): 字卡 + emoji, a short phrase
(短语), a syntactic-structure formula (数学), pinyin with tone marks (拼音), English, a Chinese sentence (中文),
Japanese and Korean. The pinyin was produced once with ``pypinyin`` (``Style.TONE``, syllables joined by a space)
and frozen here, so generated files do not change when the installed ``pypinyin`` does.

Every level value is unique across concepts: the per-level training pairs (``[EN] Video chat`` → sentence) would
otherwise give one input two different answers.
"""

from __future__ import annotations

from dataclasses import dataclass

# Part of speech → phrase label used in the level-3 "数学" structure formula.
_PHRASE_LABEL = {"N": "NP", "V": "VP", "A": "AP"}


@dataclass(frozen=True)
class Concept:
    concept: str
    emoji: str
    pos: str  # N | V | A
    phrase: str
    pinyin: str
    english: str
    sentence: str
    japanese: str
    korean: str

    @property
    def math(self) -> str:
        label = _PHRASE_LABEL[self.pos]
        return f"S = {label} ({label}: {self.concept})"

    def record(self) -> dict[str, object]:
        """The HLBD Full record, field names exactly as the file format has them."""
        return {
            "concept": self.concept,
            "level_1": {"字卡": self.concept, "emoji": self.emoji},
            "level_2": {"短语": self.phrase},
            "level_3": {"数学": self.math},
            "level_4": {"拼音": self.pinyin},
            "level_5": {"英文": self.english},
            "level_6": {"中文": self.sentence},
            "level_7": {"日文": self.japanese},
            "level_8": {"韩文": self.korean},
        }


# (concept, emoji, pos, 短语, 拼音, English, 中文 sentence, 日文, 韩文)
# fmt: off
_TABLE: tuple[tuple[str, str, str, str, str, str, str, str, str], ...] = (
    ("视频聊天", "📹", "V", "视频聊天吧", "shì pín liáo tiān", "Video chat", "记得视频聊天。", "ビデオ通話", "영상통화"),
    ("苹果", "🍎", "N", "一个苹果", "píng guǒ", "Apple", "我喜欢吃苹果。", "りんご", "사과"),
    ("香蕉", "🍌", "N", "两根香蕉", "xiāng jiāo", "Banana", "猴子爱吃香蕉。", "バナナ", "바나나"),
    ("猫", "🐱", "N", "一只猫", "māo", "Cat", "猫在沙发上睡觉。", "猫", "고양이"),
    ("狗", "🐶", "N", "一条狗", "gǒu", "Dog", "狗在院子里跑。", "犬", "개"),
    ("太阳", "🌞", "N", "红红的太阳", "tài yáng", "Sun", "太阳升起来了。", "太陽", "태양"),
    ("月亮", "🌙", "N", "弯弯的月亮", "yuè liàng", "Moon", "今晚的月亮很圆。", "月", "달"),
    ("星星", "⭐", "N", "满天星星", "xīng xīng", "Star", "天上有很多星星。", "星", "별"),
    ("雨", "☔", "N", "一场雨", "yǔ", "Rain", "外面在下雨。", "雨", "비"),
    ("雪", "⛄", "N", "白白的雪", "xuě", "Snow", "冬天会下雪。", "雪", "눈"),
    ("花", "🌸", "N", "一朵花", "huā", "Flower", "花园里开满了花。", "花", "꽃"),
    ("树", "🌳", "N", "一棵树", "shù", "Tree", "树下很凉快。", "木", "나무"),
    ("水", "💧", "N", "一杯水", "shuǐ", "Water", "记得多喝水。", "水", "물"),
    ("火", "🔥", "N", "小心火", "huǒ", "Fire", "火很危险。", "火", "불"),
    ("书", "📚", "N", "一本书", "shū", "Book", "我在看书。", "本", "책"),
    ("学校", "🏫", "N", "去学校", "xué xiào", "School", "学校离家很近。", "学校", "학교"),
    ("医生", "🩺", "N", "看医生", "yī shēng", "Doctor", "医生在给病人看病。", "医者", "의사"),
    ("老师", "👩‍🏫", "N", "我的老师", "lǎo shī", "Teacher", "老师在上课。", "先生", "선생님"),
    ("朋友", "🤝", "N", "好朋友", "péng yǒu", "Friend", "他是我的朋友。", "友達", "친구"),
    ("家", "🏠", "N", "回家", "jiā", "Home", "我想回家。", "家", "집"),
    ("汽车", "🚗", "N", "一辆汽车", "qì chē", "Car", "汽车开得很快。", "車", "자동차"),
    ("飞机", "✈", "N", "坐飞机", "fēi jī", "Airplane", "飞机起飞了。", "飛行機", "비행기"),
    ("火车", "🚄", "N", "坐火车", "huǒ chē", "Train", "火车进站了。", "電車", "기차"),
    ("自行车", "🚲", "N", "骑自行车", "zì xíng chē", "Bicycle", "我骑自行车上学。", "自転車", "자전거"),
    ("电话", "📞", "N", "打电话", "diàn huà", "Telephone", "电话响了。", "電話", "전화"),
    ("电脑", "💻", "N", "用电脑", "diàn nǎo", "Computer", "电脑开机了。", "パソコン", "컴퓨터"),
    ("音乐", "🎵", "N", "听音乐", "yīn yuè", "Music", "我喜欢听音乐。", "音楽", "음악"),
    ("跑步", "🏃", "V", "去跑步", "pǎo bù", "Run", "他每天早上跑步。", "ランニング", "달리기"),
    ("游泳", "🏊", "V", "去游泳", "yóu yǒng", "Swim", "夏天适合游泳。", "水泳", "수영"),
    ("睡觉", "😴", "V", "早点睡觉", "shuì jiào", "Sleep", "该睡觉了。", "寝る", "잠자다"),
    ("吃饭", "🍚", "V", "一起吃饭", "chī fàn", "Eat", "我们去吃饭。", "ご飯を食べる", "밥을 먹다"),
    ("喝茶", "🍵", "V", "喝杯茶", "hē chá", "Drink tea", "爷爷喜欢喝茶。", "お茶を飲む", "차를 마시다"),
    ("唱歌", "🎤", "V", "一起唱歌", "chàng gē", "Sing", "她在唱歌。", "歌う", "노래하다"),
    ("跳舞", "💃", "V", "跳支舞", "tiào wǔ", "Dance", "我们一起跳舞吧。", "踊る", "춤추다"),
    ("学习", "📖", "V", "好好学习", "xué xí", "Study", "我在学习中文。", "勉強", "공부"),
    ("工作", "💼", "V", "努力工作", "gōng zuò", "Work", "爸爸去工作了。", "仕事", "일"),
    ("写字", "✏", "V", "认真写字", "xiě zì", "Write", "他在认真写字。", "字を書く", "글씨를 쓰다"),
    ("拍照", "📷", "V", "拍张照", "pāi zhào", "Take a photo", "我们来拍照吧。", "写真を撮る", "사진을 찍다"),
    ("购物", "🛒", "V", "去购物", "gòu wù", "Shopping", "周末去购物。", "買い物", "쇼핑"),
    ("做饭", "🍳", "V", "学做饭", "zuò fàn", "Cook", "妈妈在做饭。", "料理する", "요리하다"),
    ("快乐", "😄", "A", "很快乐", "kuài lè", "Happy", "祝你天天快乐。", "楽しい", "행복"),
    ("难过", "😢", "A", "有点难过", "nán guò", "Sad", "别难过了。", "悲しい", "슬프다"),
    ("生气", "😠", "A", "不要生气", "shēng qì", "Angry", "他很生气。", "怒る", "화나다"),
    ("害怕", "😨", "A", "别害怕", "hài pà", "Afraid", "我有点害怕。", "怖い", "무섭다"),
    ("累", "😫", "A", "好累", "lèi", "Tired", "今天真累。", "疲れた", "피곤하다"),
    ("热", "🥵", "A", "天气热", "rè", "Hot", "今天很热。", "暑い", "덥다"),
    ("冷", "🥶", "A", "天气冷", "lěng", "Cold", "外面很冷。", "寒い", "춥다"),
    ("大", "🐘", "A", "很大", "dà", "Big", "大象很大。", "大きい", "크다"),
    ("小", "🐜", "A", "很小", "xiǎo", "Small", "蚂蚁很小。", "小さい", "작다"),
    ("爱", "❤", "V", "我爱你", "ài", "Love", "爱是一种力量。", "愛", "사랑"),
    ("生日", "🎂", "N", "过生日", "shēng rì", "Birthday", "今天是我的生日。", "誕生日", "생일"),
    ("礼物", "🎁", "N", "一份礼物", "lǐ wù", "Gift", "谢谢你的礼物。", "プレゼント", "선물"),
    ("咖啡", "☕", "N", "一杯咖啡", "kā fēi", "Coffee", "我每天喝咖啡。", "コーヒー", "커피"),
    ("面包", "🍞", "N", "一块面包", "miàn bāo", "Bread", "早餐吃面包。", "パン", "빵"),
    ("蛋糕", "🍰", "N", "一块蛋糕", "dàn gāo", "Cake", "蛋糕很甜。", "ケーキ", "케이크"),
    ("钱", "💰", "N", "很多钱", "qián", "Money", "钱要省着花。", "お金", "돈"),
    ("时间", "⏰", "N", "没有时间", "shí jiān", "Time", "时间过得很快。", "時間", "시간"),
    ("手机", "📱", "N", "新手机", "shǒu jī", "Mobile phone", "我的手机没电了。", "携帯電話", "휴대폰"),
    ("海", "🌊", "N", "蓝色的海", "hǎi", "Sea", "我们去海边玩。", "海", "바다"),
    ("山", "⛰", "N", "高高的山", "shān", "Mountain", "山上有很多树。", "山", "산"),
    ("鱼", "🐟", "N", "一条鱼", "yú", "Fish", "鱼在水里游。", "魚", "물고기"),
    ("鸟", "🐦", "N", "一只鸟", "niǎo", "Bird", "鸟在天上飞。", "鳥", "새"),
    ("马", "🐴", "N", "一匹马", "mǎ", "Horse", "马跑得很快。", "馬", "말"),
    ("熊猫", "🐼", "N", "大熊猫", "xióng māo", "Panda", "熊猫喜欢吃竹子。", "パンダ", "판다"),
    ("电影", "🎬", "N", "看电影", "diàn yǐng", "Movie", "我们去看电影。", "映画", "영화"),
    ("足球", "⚽", "N", "踢足球", "zú qiú", "Football", "他们在踢足球。", "サッカー", "축구"),
    ("彩虹", "🌈", "N", "一道彩虹", "cǎi hóng", "Rainbow", "雨后有彩虹。", "虹", "무지개"),
    ("医院", "🏥", "N", "去医院", "yī yuàn", "Hospital", "他住进了医院。", "病院", "병원"),
    ("公园", "🎡", "N", "逛公园", "gōng yuán", "Park", "公园里有很多人。", "公園", "공원"),
    ("谢谢", "🙏", "V", "谢谢你", "xiè xiè", "Thank you", "谢谢你的帮助。", "ありがとう", "감사합니다"),
    ("再见", "👋", "V", "说再见", "zài jiàn", "Goodbye", "明天见，再见。", "さようなら", "안녕히 가세요"),
    ("晚安", "🌛", "V", "说晚安", "wǎn ān", "Good night", "祝你晚安。", "おやすみなさい", "잘 자요"),
)
# fmt: on

CONCEPTS: tuple[Concept, ...] = tuple(Concept(*row) for row in _TABLE)
