//! [`EnvSwitch`]: a process-wide on/off choice, read once from an environment variable
//! unless set in code (the kernels' opt-in and opt-out paths).

use std::sync::atomic::{AtomicU8, Ordering};

/// A process-wide on/off choice, read once from an environment variable unless set in code.
///
/// ```
/// use flexgen_core::EnvSwitch;
/// static FAST: EnvSwitch = EnvSwitch::new("MY_CRATE_FAST_PATH", true);
/// FAST.set(false);
/// assert!(!FAST.get());
/// ```
#[derive(Debug)]
pub struct EnvSwitch {
    /// 0 = not read yet, 1 = on, 2 = off.
    state: AtomicU8,
    /// The variable, read by [`EnvSwitch::get`] until [`EnvSwitch::set`] decides.
    var: &'static str,
    /// The choice when the variable is unset or says neither on nor off.
    default: bool,
}

impl EnvSwitch {
    /// A switch read from `var` at the first [`EnvSwitch::get`], `default` when the variable
    /// is unset or unrecognised.
    pub const fn new(var: &'static str, default: bool) -> EnvSwitch {
        EnvSwitch {
            state: AtomicU8::new(0),
            var,
            default,
        }
    }

    /// The choice: the last [`EnvSwitch::set`], else the variable (read once: `1`, `on`,
    /// `true`, `yes` turn it on; `0`, `off`, `false`, `no` off; case and surrounding spaces
    /// ignored), else the default.
    pub fn get(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let value = std::env::var(self.var).unwrap_or_default();
                let on = parse(&value).unwrap_or(self.default);
                self.set(on);
                on
            }
        }
    }

    /// Decides the choice for the whole process (overrides the variable).
    pub fn set(&self, on: bool) {
        self.state.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }
}

/// An on/off word, or `None` when `value` is neither.
fn parse(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => Some(true),
        "0" | "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_defaults() {
        for (value, want) in [
            ("1", Some(true)),
            (" On ", Some(true)),
            ("TRUE", Some(true)),
            ("yes", Some(true)),
            ("0", Some(false)),
            ("off", Some(false)),
            ("False", Some(false)),
            ("no", Some(false)),
            ("", None),
            ("maybe", None),
        ] {
            assert_eq!(parse(value), want, "{value:?}");
        }
        // Unset variable: the default, until set.
        let s = EnvSwitch::new("FLEXGEN_TEST_ENV_SWITCH_NEVER_SET", true);
        assert!(s.get());
        s.set(false);
        assert!(!s.get());
    }
}
