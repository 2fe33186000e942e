//! The chat template of FlexGen's chatbot: a preamble, then `Human: ...` / `Assistant: ...`
//! turns, each prompt ending with `Assistant:` so the model writes only the reply.

use serde::{Deserialize, Serialize};

/// FlexGen's chatbot preamble: the context line and its two example turns.
pub const DEFAULT_PREAMBLE: &str =
    "A chat between a curious human and a knowledgeable artificial intelligence assistant.\n\
Human: Hello! What can you do?\n\
Assistant: As an AI assistant, I can answer questions and chat with you.\n\
Human: What is the name of the tallest mountain in the world?\n\
Assistant: Everest.\n";

/// Who said a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Replaces the preamble.
    System,
    /// The human (`Human:` lines).
    User,
    /// The model (`Assistant:` lines).
    Assistant,
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Speaker.
    pub role: Role,
    /// What was said.
    pub content: String,
}

impl ChatMessage {
    /// A turn by `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: content.into(),
        }
    }
}

/// The text of one human turn followed by the assistant's cue: `Human: {text}\nAssistant:`.
pub fn human_turn(text: &str) -> String {
    format!("Human: {}\nAssistant:", text.trim_end())
}

/// The text that follows a finished assistant reply: ` {reply}\n`.
pub fn assistant_reply(reply: &str) -> String {
    format!(" {}\n", reply.trim())
}

/// Renders a whole conversation as one prompt ending in `Assistant:`. The last `system`
/// message (if any) replaces [`DEFAULT_PREAMBLE`] (a newline is added when missing).
pub fn render(messages: &[ChatMessage]) -> String {
    let preamble = messages
        .iter()
        .rev()
        .find(|m| m.role == Role::System)
        .map(|m| {
            let mut p = m.content.clone();
            if !p.is_empty() && !p.ends_with('\n') {
                p.push('\n');
            }
            p
        })
        .unwrap_or_else(|| DEFAULT_PREAMBLE.to_string());
    let mut out = preamble;
    for m in messages {
        match m.role {
            Role::System => {}
            Role::User => {
                out.push_str(&human_turn(&m.content));
                out.push('\n');
            }
            Role::Assistant => {
                // Replace the newline after the preceding "Assistant:" cue by the reply.
                if out.ends_with("Assistant:\n") {
                    out.pop();
                    out.push_str(&assistant_reply(&m.content));
                } else {
                    out.push_str("Assistant:");
                    out.push_str(&assistant_reply(&m.content));
                }
            }
        }
    }
    if out.ends_with("Assistant:\n") {
        out.pop();
    } else {
        out.push_str("Assistant:");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_flexgen_layout() {
        let msgs = [
            ChatMessage::new(Role::User, "Hi there"),
            ChatMessage::new(Role::Assistant, "Hello."),
            ChatMessage::new(Role::User, "How tall is Everest?"),
        ];
        let text = render(&msgs);
        assert_eq!(
            text,
            format!(
                "{DEFAULT_PREAMBLE}Human: Hi there\nAssistant: Hello.\nHuman: How tall is Everest?\nAssistant:"
            )
        );
    }

    #[test]
    fn system_message_replaces_preamble() {
        let msgs = [
            ChatMessage::new(Role::System, "You are terse."),
            ChatMessage::new(Role::User, "Hi"),
        ];
        assert_eq!(render(&msgs), "You are terse.\nHuman: Hi\nAssistant:");
    }

    #[test]
    fn turns_concatenate_to_render() {
        // Incremental chat (preamble + turn + reply + turn) must equal rendering the whole.
        let text = format!(
            "{DEFAULT_PREAMBLE}{}{}{}",
            human_turn("a"),
            assistant_reply("b"),
            human_turn("c")
        );
        let msgs = [
            ChatMessage::new(Role::User, "a"),
            ChatMessage::new(Role::Assistant, "b"),
            ChatMessage::new(Role::User, "c"),
        ];
        assert_eq!(text, render(&msgs));
    }
}
