// UI text in English and Chinese. Elements name their text with data-i18n (text content),
// data-i18n-label (aria-label), data-i18n-placeholder; the choice is kept in localStorage.

const TEXT = {
  en: {
    "app.title": "VoiceGrow console",
    "talk.title": "VoiceGrow talk",
    "lang.switch": "中文",
    "lang.label": "Switch language",
    "nav.console": "Console",
    "nav.talk": "Talk page",
    "auth.token": "Admin token",
    "auth.signin": "Sign in",
    "auth.signout": "Sign out",
    "auth.needed": "Sign in with the server's admin token (ADMIN_TOKEN).",
    "auth.wrong": "The server refused this token.",
    "sessions.title": "Live sessions",
    "sessions.none": "No session is connected.",
    "col.device": "Device",
    "col.protocol": "Protocol",
    "col.state": "State",
    "col.since": "Since",
    "col.turns": "Turns",
    "col.address": "Address",
    "col.lastseen": "Last seen",
    "col.live": "Live",
    "health.title": "Health",
    "health.spool": "spool",
    "latency.title": "Latency of the last turns (ms after the end of speech)",
    "latency.none": "No turn has been timed yet.",
    "devices.title": "Devices",
    "devices.none": "No device has talked yet.",
    "devices.show": "Conversations",
    "devices.delete": "Delete data",
    "devices.confirm": "Delete every turn, recording and the history of {device}?",
    "devices.deleted": "Deleted the data of {device}.",
    "turns.title": "Conversations",
    "turns.all": "all devices",
    "turns.search": "Search transcripts and replies",
    "turns.searchButton": "Search",
    "turns.none": "No conversation matches.",
    "turns.more": "More",
    "turns.heard": "Heard",
    "turns.replied": "Replied",
    "turns.in": "Question audio",
    "turns.out": "Reply audio",
    "turns.play": "Play",
    "state.handshake": "connecting", "state.listening": "listening", "state.hearing": "hearing speech",
    "state.waiting_for_wake": "waiting for the wake word",
    "state.thinking": "thinking", "state.speaking": "speaking",
    "stage.speech_end": "end of speech", "stage.asr_done": "ASR done", "stage.llm_first_token": "LLM first token",
    "stage.first_sentence": "first sentence", "stage.tts_first_audio": "TTS first audio",
    "stage.first_audio_sent": "first audio sent", "stage.last_audio_sent": "last audio sent",
    "error.load": "Could not load: {reason}",
    "talk.button": "Talk",
    "talk.stop": "Stop reply",
    "talk.device": "Device id",
    "talk.secret": "Device secret (with DEVICE_AUTH)",
    "talk.status.idle": "Press Talk and speak.",
    "talk.status.connecting": "Connecting…",
    "talk.status.listening": "Listening — speak now.",
    "talk.status.closed": "Disconnected.",
    "talk.status.refused": "Refused: {reason}",
    "talk.status.nomic": "No microphone: {reason}",
    "talk.log": "Conversation",
    "talk.you": "You",
    "talk.assistant": "Assistant",
    "talk.timings": "Timings",
    "talk.played": "Reply audio played: {seconds} s",
    "talk.interrupted": "(interrupted)",
    "talk.signin": "Sign in as operator, or give a device credential.",
  },
  zh: {
    "app.title": "VoiceGrow 控制台",
    "talk.title": "VoiceGrow 对话",
    "lang.switch": "English",
    "lang.label": "切换语言",
    "nav.console": "控制台",
    "nav.talk": "对话页",
    "auth.token": "管理令牌",
    "auth.signin": "登录",
    "auth.signout": "退出",
    "auth.needed": "请用服务器的管理令牌（ADMIN_TOKEN）登录。",
    "auth.wrong": "服务器拒绝了这个令牌。",
    "sessions.title": "在线会话",
    "sessions.none": "当前没有设备连接。",
    "col.device": "设备",
    "col.protocol": "协议",
    "col.state": "状态",
    "col.since": "开始于",
    "col.turns": "轮次",
    "col.address": "地址",
    "col.lastseen": "最近在线",
    "col.live": "在线",
    "health.title": "组件状态",
    "health.spool": "待写队列",
    "latency.title": "最近几轮的延迟（语音结束后的毫秒数）",
    "latency.none": "还没有计时的对话。",
    "devices.title": "设备",
    "devices.none": "还没有设备说过话。",
    "devices.show": "对话记录",
    "devices.delete": "删除数据",
    "devices.confirm": "删除 {device} 的全部对话、录音和历史？",
    "devices.deleted": "已删除 {device} 的数据。",
    "turns.title": "对话记录",
    "turns.all": "全部设备",
    "turns.search": "搜索识别文本和回复",
    "turns.searchButton": "搜索",
    "turns.none": "没有匹配的对话。",
    "turns.more": "更多",
    "turns.heard": "听到",
    "turns.replied": "回复",
    "turns.in": "提问录音",
    "turns.out": "回复录音",
    "turns.play": "播放",
    "state.handshake": "连接中", "state.listening": "聆听", "state.hearing": "正在听",
    "state.waiting_for_wake": "等待唤醒词",
    "state.thinking": "思考中", "state.speaking": "说话中",
    "stage.speech_end": "语音结束", "stage.asr_done": "识别完成", "stage.llm_first_token": "模型首字",
    "stage.first_sentence": "首句", "stage.tts_first_audio": "合成首段音频",
    "stage.first_audio_sent": "首段音频发出", "stage.last_audio_sent": "末段音频发出",
    "error.load": "加载失败：{reason}",
    "talk.button": "对话",
    "talk.stop": "停止回复",
    "talk.device": "设备 ID",
    "talk.secret": "设备密钥（DEVICE_AUTH 开启时）",
    "talk.status.idle": "按“对话”然后说话。",
    "talk.status.connecting": "连接中…",
    "talk.status.listening": "正在聆听，请说话。",
    "talk.status.closed": "已断开。",
    "talk.status.refused": "被拒绝：{reason}",
    "talk.status.nomic": "没有麦克风：{reason}",
    "talk.log": "对话记录",
    "talk.you": "你",
    "talk.assistant": "助手",
    "talk.timings": "耗时",
    "talk.played": "已播放回复音频 {seconds} 秒",
    "talk.interrupted": "（被打断）",
    "talk.signin": "请以管理员登录，或填写设备凭据。",
  },
};

const STORE_KEY = "voicegrow.lang";

export function currentLang() {
  const saved = localStorage.getItem(STORE_KEY);
  if (saved === "en" || saved === "zh") return saved;
  return (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en";
}

export function t(key, params = {}) {
  const text = TEXT[currentLang()][key] ?? TEXT.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(params[name] ?? ""));
}

export function applyI18n(root = document) {
  document.documentElement.lang = currentLang() === "zh" ? "zh-CN" : "en";
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-label]")) el.setAttribute("aria-label", t(el.dataset.i18nLabel));
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
}

/** Wires the language button; onChange re-renders what the page drew itself. */
export function setupLanguageSwitch(button, onChange = () => {}) {
  applyI18n();
  button.addEventListener("click", () => {
    localStorage.setItem(STORE_KEY, currentLang() === "zh" ? "en" : "zh");
    applyI18n();
    onChange();
  });
}
