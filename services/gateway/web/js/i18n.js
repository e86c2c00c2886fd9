// Interface text in English and Russian. The browser's language picks; the switch in the header overrides (kept).
const STRINGS = {
  en: {
    "nav.chat": "Chat", "nav.memory": "Memory", "nav.views": "Views", "nav.gpu": "GPU", "nav.users": "Users and keys",
    "lang.label": "Language", "common.close": "Close", "common.delete": "Delete",
    "signin.title": "Sign in", "signin.key": "API key", "signin.submit": "Sign in", "signin.out": "Sign out",
    "signin.hint": "Paste an API key. `baton up` writes one to BATON_HOME/api.key (the admin key is in admin.key). It stays in this tab only.",
    "signin.as": "{user} · tenant {tenant}", "signin.admin": "admin",
    "error.key": "This API key is not valid (unknown, revoked or mistyped). Check it and sign in again.",
    "error.offline": "The gateway does not answer. Is the stack running (baton up)?",
    "error.status": "The request failed (HTTP {status}).",
    "chat.model": "Model", "chat.rag": "Answer from memory", "chat.collection": "Collection",
    "chat.conversation": "Conversation", "chat.new": "New conversation", "chat.input": "Your question",
    "chat.placeholder": "Ask about your documents…", "chat.send": "Send", "chat.stop": "Stop",
    "chat.stopped": "(stopped)", "chat.sources": "Sources", "chat.page": "page {page}",
    "chat.untitled": "New conversation",
    "memory.add": "Add documents", "memory.drop": "Drop files or folders here", "memory.files": "Choose files",
    "memory.folder": "Choose a folder", "memory.progress": "Ingest progress", "memory.search": "Search",
    "memory.query": "Query", "memory.mode": "Mode", "memory.find": "Search", "memory.document": "Document",
    "memory.passage": "Passage", "memory.score": "Score", "memory.documents": "Documents", "memory.chunks": "Chunks",
    "memory.size": "Size", "memory.nohits": "Nothing found.",
    "memory.uploading": "Ingesting {done} of {total} files…",
    "memory.done": "Done: {added} added, {unchanged} unchanged, {failed} failed.",
    "memory.skipped": "{count} files skipped (not txt, md, html, pdf or docx).",
    "memory.delete": "Delete {title}",
    "views.train": "Train views on a collection", "views.name": "Adapter name", "views.steps": "Steps",
    "views.rank": "LoRA rank", "views.lr": "Learning rate", "views.seq": "Sequence length",
    "views.qlora": "4-bit base (QLoRA)", "views.estimate": "Estimate", "views.start": "Start training",
    "views.job": "Job", "views.cancel": "Cancel", "views.jobs": "Recent jobs", "views.state": "State",
    "views.adapters": "Adapters", "views.version": "Version", "views.ppl": "Perplexity before → after",
    "views.served": "Served", "views.plot": "Loss and eval loss by step", "views.follow": "Follow {id}",
    "views.estimated": "Estimate: {vram} of GPU memory, {ram} of RAM, {disk} of disk, about {time} ({docs} documents, {tokens} tokens).",
    "views.progress": "Step {step} of {total} · loss {loss} · {rate} tokens/s · ETA {eta}",
    "views.result": "Adapter {name} v{version}: perplexity {before} → {after}.",
    "views.loss": "loss", "views.evalloss": "eval loss", "views.yes": "yes", "views.no": "no",
    "gpu.holders": "Holds the GPU now", "gpu.kind": "Kind", "gpu.holder": "Holder", "gpu.held": "Held for",
    "gpu.eta": "Free in", "gpu.queue": "Waiting", "gpu.waited": "Waited", "gpu.timeline": "The last hour",
    "gpu.summary": "{used} of {capacity} in use ({source}) · policy {policy}", "gpu.free": "Nobody holds the GPU.",
    "gpu.nobody": "Nobody waits.", "gpu.now": "now", "gpu.minago": "−{n} min",
    "users.create": "New user", "users.name": "Name", "users.tenant": "Tenant", "users.same": "same as the name",
    "users.add": "Create", "users.keys": "Keys", "users.issue": "New key for {name}", "users.remove": "Delete {name}",
    "users.secret": "Key for {name} (shown once, copy it now): {key}",
    "users.revoke": "revoke", "users.revokeKey": "revoke {prefix}", "users.revoked": "revoked", "chat.all": "all",
  },
  ru: {
    "nav.chat": "Чат", "nav.memory": "Память", "nav.views": "Взгляды", "nav.gpu": "GPU", "nav.users": "Пользователи и ключи",
    "lang.label": "Язык", "common.close": "Закрыть", "common.delete": "Удалить",
    "signin.title": "Вход", "signin.key": "API-ключ", "signin.submit": "Войти", "signin.out": "Выйти",
    "signin.hint": "Вставьте API-ключ. `baton up` записывает его в BATON_HOME/api.key (ключ администратора — в admin.key). Он хранится только в этой вкладке.",
    "signin.as": "{user} · арендатор {tenant}", "signin.admin": "администратор",
    "error.key": "Этот API-ключ недействителен (неизвестен, отозван или введён с ошибкой). Проверьте его и войдите снова.",
    "error.offline": "Шлюз не отвечает. Запущен ли стек (baton up)?",
    "error.status": "Запрос не удался (HTTP {status}).",
    "chat.model": "Модель", "chat.rag": "Отвечать по памяти", "chat.collection": "Коллекция",
    "chat.conversation": "Беседа", "chat.new": "Новая беседа", "chat.input": "Ваш вопрос",
    "chat.placeholder": "Спросите о своих документах…", "chat.send": "Отправить", "chat.stop": "Стоп",
    "chat.stopped": "(остановлено)", "chat.sources": "Источники", "chat.page": "стр. {page}",
    "chat.untitled": "Новая беседа",
    "memory.add": "Добавить документы", "memory.drop": "Перетащите сюда файлы или папки", "memory.files": "Выбрать файлы",
    "memory.folder": "Выбрать папку", "memory.progress": "Ход загрузки", "memory.search": "Поиск",
    "memory.query": "Запрос", "memory.mode": "Режим", "memory.find": "Найти", "memory.document": "Документ",
    "memory.passage": "Фрагмент", "memory.score": "Оценка", "memory.documents": "Документы", "memory.chunks": "Фрагменты",
    "memory.size": "Размер", "memory.nohits": "Ничего не найдено.",
    "memory.uploading": "Загружено {done} из {total} файлов…",
    "memory.done": "Готово: добавлено {added}, без изменений {unchanged}, с ошибкой {failed}.",
    "memory.skipped": "Пропущено файлов: {count} (не txt, md, html, pdf или docx).",
    "memory.delete": "Удалить {title}",
    "views.train": "Обучить взгляды на коллекции", "views.name": "Имя адаптера", "views.steps": "Шаги",
    "views.rank": "Ранг LoRA", "views.lr": "Скорость обучения", "views.seq": "Длина последовательности",
    "views.qlora": "4-битная база (QLoRA)", "views.estimate": "Оценить", "views.start": "Начать обучение",
    "views.job": "Задача", "views.cancel": "Отменить", "views.jobs": "Последние задачи", "views.state": "Состояние",
    "views.adapters": "Адаптеры", "views.version": "Версия", "views.ppl": "Перплексия до → после",
    "views.served": "Обслуживается", "views.plot": "Потери и потери на проверке по шагам", "views.follow": "Следить за {id}",
    "views.estimated": "Оценка: {vram} памяти GPU, {ram} ОЗУ, {disk} на диске, около {time} ({docs} документов, {tokens} токенов).",
    "views.progress": "Шаг {step} из {total} · потери {loss} · {rate} токенов/с · осталось {eta}",
    "views.result": "Адаптер {name} v{version}: перплексия {before} → {after}.",
    "views.loss": "потери", "views.evalloss": "потери на проверке", "views.yes": "да", "views.no": "нет",
    "gpu.holders": "Сейчас GPU у", "gpu.kind": "Вид", "gpu.holder": "Держатель", "gpu.held": "Держит",
    "gpu.eta": "Освободит через", "gpu.queue": "Ждут", "gpu.waited": "Ждёт", "gpu.timeline": "Последний час",
    "gpu.summary": "Занято {used} из {capacity} ({source}) · политика {policy}", "gpu.free": "GPU свободен.",
    "gpu.nobody": "Никто не ждёт.", "gpu.now": "сейчас", "gpu.minago": "−{n} мин",
    "users.create": "Новый пользователь", "users.name": "Имя", "users.tenant": "Арендатор", "users.same": "как имя",
    "users.add": "Создать", "users.keys": "Ключи", "users.issue": "Новый ключ для {name}", "users.remove": "Удалить {name}",
    "users.secret": "Ключ для {name} (показан один раз, скопируйте сейчас): {key}",
    "users.revoke": "отозвать", "users.revokeKey": "отозвать {prefix}", "users.revoked": "отозван", "chat.all": "все",
  },
};

const CHOSEN = "baton.lang";
export let lang = localStorage.getItem(CHOSEN) || (navigator.language || "en").slice(0, 2);
if (!STRINGS[lang]) lang = "en";

export function t(key, vars = {}) {
  const text = STRINGS[lang][key] ?? STRINGS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(vars[name] ?? ""));
}

// Static text carries data-i18n (text), data-i18n-placeholder and data-i18n-label (aria-label).
export function translate(root = document) {
  document.documentElement.lang = lang;
  for (const node of root.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  for (const node of root.querySelectorAll("[data-i18n-placeholder]")) node.placeholder = t(node.dataset.i18nPlaceholder);
  for (const node of root.querySelectorAll("[data-i18n-label]")) node.setAttribute("aria-label", t(node.dataset.i18nLabel));
}

export function setLang(value) {
  lang = STRINGS[value] ? value : "en";
  localStorage.setItem(CHOSEN, lang);
  translate();
}
