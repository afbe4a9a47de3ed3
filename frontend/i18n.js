// Interface text in English and Simplified Chinese. The choice is kept per browser.
const STRINGS = {
  en: {
    title: "LLM Bench Shower", nav_launch: "Launch", nav_queue: "Queue", nav_compare: "Compare",
    nav_models: "Models & memory", language: "中文",
    model: "Model", custom_path: "or a checkpoint folder / cached hub id", datasets: "Datasets",
    params: "Parameters", submit: "Launch evaluation", submitted: "Queued",
    no_dataset: "Pick at least one dataset.",
    id: "ID", dataset: "Dataset", state: "State", progress: "Progress", eta: "ETA",
    worker: "Worker", location: "Model location", actions: "Actions", cancel: "Cancel",
    delete: "Delete", error: "Error", no_jobs: "No jobs yet.",
    overall: "Overall score", heatmap: "Score by context length × depth",
    context_length: "Context length", depth: "Depth %", memory_chart: "Peak memory per sample",
    memory_peaks: "Memory peaks", events: "Model events", samples: "Samples",
    failures_only: "Failures only", prompt: "Prompt", prediction: "Prediction", score: "Score",
    latency: "Latency (s)", export_json: "Export JSON", export_csv: "Export CSV",
    back: "Back to queue", compare_table: "Models × datasets", throughput: "Samples/s",
    peak_memory: "Peak RSS (MB)", side_by_side: "Side by side", pick_job: "pick a job",
    stats: "Memory", usage: "Managed memory", limit: "Limit", pressure: "Pressure",
    system_available: "System RAM available", recommended: "Recommended to unload",
    set_limit: "Set limit (GB)", set_timeout: "GPU idle timeout (s)", apply: "Apply",
    size: "Size", idle: "Idle (s)", pinned: "Pinned", offload: "Offload", release: "Release",
    pin: "Pin", unpin: "Unpin", loads: "Loads", no_models: "No model is loaded.",
    gpu_memory: "GPU memory", none: "none", yes: "yes", no: "no",
    token_prompt: "This server needs an API token (LBS_API_TOKEN):",
    queued: "queued", running: "running", succeeded: "succeeded", failed: "failed",
    cancelled: "cancelled",
  },
  zh: {
    title: "LLM Bench Shower", nav_launch: "发起评测", nav_queue: "任务队列", nav_compare: "对比",
    nav_models: "模型与内存", language: "English",
    model: "模型", custom_path: "或输入检查点目录 / 已缓存的 Hub ID", datasets: "数据集",
    params: "参数", submit: "开始评测", submitted: "已加入队列",
    no_dataset: "请至少选择一个数据集。",
    id: "编号", dataset: "数据集", state: "状态", progress: "进度", eta: "预计剩余",
    worker: "工作进程", location: "模型位置", actions: "操作", cancel: "取消",
    delete: "删除", error: "错误", no_jobs: "暂无任务。",
    overall: "总分", heatmap: "按上下文长度 × 深度的得分",
    context_length: "上下文长度", depth: "深度 %", memory_chart: "每个样本的峰值内存",
    memory_peaks: "内存峰值", events: "模型事件", samples: "样本",
    failures_only: "只看失败", prompt: "提示词", prediction: "预测", score: "得分",
    latency: "延迟（秒）", export_json: "导出 JSON", export_csv: "导出 CSV",
    back: "返回队列", compare_table: "模型 × 数据集", throughput: "样本/秒",
    peak_memory: "峰值 RSS（MB）", side_by_side: "并排对比", pick_job: "选择任务",
    stats: "内存", usage: "托管内存", limit: "上限", pressure: "内存压力",
    system_available: "系统可用内存", recommended: "建议卸载",
    set_limit: "设置上限（GB）", set_timeout: "GPU 空闲超时（秒）", apply: "应用",
    size: "大小", idle: "空闲（秒）", pinned: "已固定", offload: "卸载到 CPU", release: "释放",
    pin: "固定", unpin: "取消固定", loads: "加载次数", no_models: "没有已加载的模型。",
    gpu_memory: "显存", none: "无", yes: "是", no: "否",
    token_prompt: "此服务器需要 API 令牌（LBS_API_TOKEN）：",
    queued: "排队中", running: "运行中", succeeded: "已完成", failed: "失败", cancelled: "已取消",
  },
};

export let lang = localStorage.getItem("lbs-lang") || "en";

export function t(key) {
  return (STRINGS[lang] && STRINGS[lang][key]) || STRINGS.en[key] || key;
}

export function setLang(value) {
  lang = value in STRINGS ? value : "en";
  localStorage.setItem("lbs-lang", lang);
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
}
