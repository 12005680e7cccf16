//! The chat targets: for each, the endpoint and the JSON body its API documents, the text limit,
//! and how to show the endpoint in logs without its secret parts. Pure (no I/O), unit-tested.
//!
//! - generic: `POST <url>` `{"user": "bot", "message": text}`
//! - Slack incoming webhook: `POST <url>` `{"text": text}`
//! - Discord webhook: `POST <url>` `{"content": text, "allowed_mentions": {"parse": []}}`, at most
//!   2000 characters (the mentions setting keeps an `@everyone` in a chunk's error from pinging)
//! - Telegram Bot API: `POST <api>/bot<token>/sendMessage` `{"chat_id": id, "text": text}`, at
//!   most 4096 characters
//!
//! A webhook URL *is* its secret (anyone holding it can post), so it is shown as
//! `scheme://host/…`; the Telegram token never appears at all.

use clap::ValueEnum;
use serde_json::json;

use common::config::Secret;

/// Which chat API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetKind {
    /// POST `{"user": "bot", "message": "..."}` to a webhook URL.
    Generic,
    /// A Slack incoming webhook.
    Slack,
    /// A Discord webhook.
    Discord,
    /// The Telegram Bot API's sendMessage.
    Telegram,
}

impl TargetKind {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Generic => "generic",
            TargetKind::Slack => "slack",
            TargetKind::Discord => "discord",
            TargetKind::Telegram => "telegram",
        }
    }

    /// The longest text the API takes, in characters.
    pub fn max_chars(self) -> usize {
        match self {
            TargetKind::Generic => 10_000,
            // Slack truncates past 40 000; long messages read badly anyway.
            TargetKind::Slack => 4_000,
            TargetKind::Discord => 2_000,
            TargetKind::Telegram => 4_096,
        }
    }
}

/// The target's settings do not make a usable endpoint. Never contains the secret.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The URL does not parse or is not http(s) with a host.
    #[error("the {what} is not an http:// or https:// URL with a host (value not shown: it is secret)")]
    BadUrl {
        /// Which setting.
        what: &'static str,
    },
    /// The token has characters that cannot go into a URL path.
    #[error("the Telegram bot token has characters a token cannot have (value not shown)")]
    BadToken,
}

/// A Telegram chat id: a number, or `@channelname`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatId {
    /// A numeric id (negative for groups).
    Number(i64),
    /// `@channelname`.
    Name(String),
}

/// A configured target.
#[derive(Clone)]
pub struct Target {
    kind: TargetKind,
    endpoint: String,
    shown: String,
    chat: Option<ChatId>,
    secrets: Vec<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// `scheme://host[:port]/…` of a URL, or None if it is not http(s) with a host. Anything after
/// the host (the path of a webhook URL is its secret) and any user info are left out.
pub fn redact_url(url: &str) -> Option<String> {
    let uri: hyper::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str().filter(|s| matches!(*s, "http" | "https"))?;
    let authority = uri.authority()?;
    let host = authority.host();
    if host.is_empty() {
        return None;
    }
    Some(match authority.port_u16() {
        Some(port) => format!("{scheme}://{host}:{port}/…"),
        None => format!("{scheme}://{host}/…"),
    })
}

impl Target {
    /// A webhook target (generic, Slack, Discord) posting to `url`.
    pub fn webhook(kind: TargetKind, url: &Secret) -> Result<Self, TargetError> {
        let url = url.expose().to_string();
        let shown = redact_url(&url).ok_or(TargetError::BadUrl { what: "webhook URL" })?;
        let mut secrets = vec![url.clone()];
        if let Some((_, rest)) = url.split_once("://") {
            if let Some((_, path)) = rest.split_once('/') {
                // The path alone is as secret as the URL (e.g. Slack's T000/B000/XXXX).
                if path.len() >= 4 {
                    secrets.push(path.to_string());
                }
            }
        }
        Ok(Target { kind, endpoint: url, shown, chat: None, secrets })
    }

    /// Telegram's sendMessage under `api` (e.g. `https://api.telegram.org`) for `token` and `chat`.
    pub fn telegram(api: &str, token: &Secret, chat: &str) -> Result<Self, TargetError> {
        let token = token.expose();
        let api = api.trim_end_matches('/');
        let shown_api = redact_url(api).ok_or(TargetError::BadUrl { what: "Telegram API base URL" })?;
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-')) {
            return Err(TargetError::BadToken);
        }
        let chat = match chat.parse::<i64>() {
            Ok(n) => ChatId::Number(n),
            Err(_) => ChatId::Name(chat.to_string()),
        };
        let shown = format!("{}bot<token>/sendMessage", shown_api.trim_end_matches('…'));
        Ok(Target {
            kind: TargetKind::Telegram,
            endpoint: format!("{api}/bot{token}/sendMessage"),
            shown,
            chat: Some(chat),
            secrets: vec![token.to_string()],
        })
    }

    /// Which API.
    pub fn kind(&self) -> TargetKind {
        self.kind
    }

    /// The URL to POST to. Secret: never log it.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// What logs may say about the target, e.g. `slack at https://hooks.slack.com/…`.
    pub fn describe(&self) -> String {
        format!("{} at {}", self.kind.name(), self.shown)
    }

    /// `text` with every secret of this target replaced, for logging what a target answered.
    pub fn redact(&self, text: &str) -> String {
        self.secrets.iter().fold(text.to_string(), |text, secret| text.replace(secret.as_str(), "<redacted>"))
    }

    /// The request body for `text`, cut to the API's limit.
    pub fn body(&self, text: &str) -> Vec<u8> {
        let text = truncate(text, self.kind.max_chars());
        let value = match self.kind {
            TargetKind::Generic => json!({"user": "bot", "message": text}),
            TargetKind::Slack => json!({"text": text}),
            TargetKind::Discord => json!({"content": text, "allowed_mentions": {"parse": []}}),
            TargetKind::Telegram => match &self.chat {
                Some(ChatId::Number(id)) => json!({"chat_id": id, "text": text}),
                Some(ChatId::Name(name)) => json!({"chat_id": name, "text": text}),
                None => json!({"text": text}),
            },
        };
        common::json::to_vec_own(&value)
    }
}

/// `text` cut to at most `max` characters, ending in `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(target: &Target, text: &str) -> serde_json::Value {
        serde_json::from_slice(&target.body(text)).unwrap()
    }

    #[test]
    fn each_target_gets_the_body_its_api_documents() {
        let url = Secret::new("https://example.com/hook/abcdef");
        let generic = Target::webhook(TargetKind::Generic, &url).unwrap();
        assert_eq!(body(&generic, "hi"), json!({"user": "bot", "message": "hi"}));
        let slack = Target::webhook(TargetKind::Slack, &url).unwrap();
        assert_eq!(body(&slack, "hi"), json!({"text": "hi"}));
        let discord = Target::webhook(TargetKind::Discord, &url).unwrap();
        assert_eq!(body(&discord, "hi"), json!({"content": "hi", "allowed_mentions": {"parse": []}}));
        let telegram = Target::telegram("https://api.telegram.org/", &Secret::new("123:AA-b_c"), "-100200").unwrap();
        assert_eq!(telegram.endpoint(), "https://api.telegram.org/bot123:AA-b_c/sendMessage");
        assert_eq!(body(&telegram, "hi"), json!({"chat_id": -100200, "text": "hi"}));
        let channel = Target::telegram("http://127.0.0.1:8080", &Secret::new("1:x"), "@pipeline").unwrap();
        assert_eq!(body(&channel, "hi"), json!({"chat_id": "@pipeline", "text": "hi"}));
    }

    #[test]
    fn discord_text_is_cut_to_2000_characters() {
        let discord =
            Target::webhook(TargetKind::Discord, &Secret::new("https://discord.com/api/webhooks/1/x")).unwrap();
        let long = "é".repeat(2500);
        let content = body(&discord, &long)["content"].as_str().unwrap().to_string();
        assert_eq!(content.chars().count(), 2000);
        assert!(content.ends_with('…'));
        assert_eq!(truncate("short", 2000), "short");
    }

    #[test]
    fn logs_show_scheme_and_host_only_and_never_the_token() {
        let slack = Target::webhook(
            TargetKind::Slack,
            &Secret::new("https://hooks.slack.com/services/T0001/B0001/XXXXXXXXXXXXXXXX"),
        )
        .unwrap();
        assert_eq!(slack.describe(), "slack at https://hooks.slack.com/…");
        assert_eq!(
            slack.redact("error posting to /services/T0001/B0001/XXXXXXXXXXXXXXXX: no"),
            "error posting to /<redacted>: no"
        );
        let telegram = Target::telegram("http://127.0.0.1:8080", &Secret::new("123456:SECRET-token"), "42").unwrap();
        assert_eq!(telegram.describe(), "telegram at http://127.0.0.1:8080/bot<token>/sendMessage");
        assert!(!format!("{telegram:?}").contains("SECRET"));
        assert_eq!(telegram.redact("bad token 123456:SECRET-token"), "bad token <redacted>");
        assert_eq!(redact_url("https://user:pw@example.com:8443/x/y?z=1").unwrap(), "https://example.com:8443/…");
    }

    #[test]
    fn bad_settings_are_refused_without_showing_them() {
        let error = Target::webhook(TargetKind::Slack, &Secret::new("hooks.slack.com/SECRET")).unwrap_err();
        assert!(!error.to_string().contains("SECRET"));
        assert!(Target::webhook(TargetKind::Slack, &Secret::new("ftp://example.com/x")).is_err());
        assert!(Target::telegram("https://api.telegram.org", &Secret::new("12/../x"), "1").is_err());
    }
}
