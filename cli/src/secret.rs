//! Secret parameter values as an operator gives them: from stdin (`-`), from a file
//! (`@FILE`), asked for without echo on a terminal, or, with a warning, on the command line.

use std::io::{IsTerminal as _, Read as _};

/// Reads the secret values of one request (stdin can be read once).
#[derive(Debug, Default)]
pub struct Input {
    stdin_taken: Option<String>,
    warned: bool,
}

impl Input {
    /// The clear value of secret parameter `name`, given as `given` (`None`: left out).
    pub fn read(&mut self, name: &str, given: Option<&str>) -> Result<String, String> {
        match given {
            Some("-") => self.stdin(name),
            Some(text) if text.starts_with('@') => {
                let path = &text[1..];
                std::fs::read_to_string(path)
                    .map(|text| without_newline(&text).to_owned())
                    .map_err(|e| format!("cannot read {name} from {path}: {e}"))
            }
            Some(text) => {
                if !std::mem::replace(&mut self.warned, true) {
                    eprintln!(
                        "rct: warning: {name} is secret, and a value on the command line stays in \
                         shell history and shows in ps; give - to read it from stdin, or @FILE"
                    );
                }
                Ok(text.to_owned())
            }
            None if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() => {
                rpassword::prompt_password(format!("{name} (secret, not echoed): "))
                    .map_err(|e| format!("cannot read {name} from the terminal: {e}"))
            }
            None => Err(format!(
                "missing parameter {name} (secret): give - to read it from stdin, or @FILE"
            )),
        }
    }

    fn stdin(&mut self, name: &str) -> Result<String, String> {
        if let Some(first) = &self.stdin_taken {
            return Err(format!(
                "{name} and {first} both read stdin; give one of them as @FILE"
            ));
        }
        self.stdin_taken = Some(name.to_owned());
        if std::io::stdin().is_terminal() {
            // Typed, then: without echo.
            return rpassword::prompt_password(format!("{name} (secret, not echoed): "))
                .map_err(|e| format!("cannot read {name} from the terminal: {e}"));
        }
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read {name} from stdin: {e}"))?;
        Ok(without_newline(&text).to_owned())
    }
}

/// `text` without the one line ending `echo` or an editor adds.
fn without_newline(text: &str) -> &str {
    let text = text.strip_suffix('\n').unwrap_or(text);
    text.strip_suffix('\r').unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_lose_one_line_ending_and_errors_name_the_parameter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "hunter2\n").unwrap();
        let mut input = Input::default();
        let at = format!("@{}", path.display());
        assert_eq!(input.read("value", Some(&at)).unwrap(), "hunter2");
        std::fs::write(&path, "two\nlines\r\n").unwrap();
        assert_eq!(input.read("value", Some(&at)).unwrap(), "two\nlines");
        let e = input.read("value", Some("@/no/such/file")).unwrap_err();
        assert!(e.starts_with("cannot read value from /no/such/file"), "{e}");
        assert_eq!(input.read("value", Some("literal")).unwrap(), "literal");
    }
}
