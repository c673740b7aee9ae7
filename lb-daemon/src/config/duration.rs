//! Durations as written in `lb.toml`: `250ms`, `2s`, `1m`, `1h`, and sums such as `1m30s`.
use std::time::Duration;

/// Parses a duration; every number needs a unit (`ms`, `s`, `m`, `h`), so `"30"` is rejected
/// rather than guessed.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration; write e.g. \"250ms\", \"2s\", \"1m\" or \"1h\"".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "invalid duration {s:?}: expected a number at {rest:?} (e.g. \"250ms\", \"2s\")"
            ));
        }
        let (num, after) = rest.split_at(digits);
        if after.starts_with('.') {
            return Err(format!(
                "invalid duration {s:?}: fractions are not supported; use a smaller unit \
                 (e.g. \"1500ms\")"
            ));
        }
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(unit_len);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
        let part = match unit {
            "ms" => Some(Duration::from_millis(n)),
            "s" => Some(Duration::from_secs(n)),
            "m" => n.checked_mul(60).map(Duration::from_secs),
            "h" => n.checked_mul(3600).map(Duration::from_secs),
            "" => {
                return Err(format!(
                    "invalid duration {s:?}: missing unit after {num} (use ms, s, m or h)"
                ));
            }
            other => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {other:?} (use ms, s, m or h)"
                ));
            }
        };
        total = part
            .and_then(|p| total.checked_add(p))
            .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
        rest = after;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_units_and_sums() {
        let ok = [
            ("250ms", Duration::from_millis(250)),
            ("2s", Duration::from_secs(2)),
            ("0s", Duration::ZERO),
            ("1m", Duration::from_secs(60)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            ("1s500ms", Duration::from_millis(1500)),
            (" 5s ", Duration::from_secs(5)),
        ];
        for (input, want) in ok {
            assert_eq!(parse_duration(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn rejects_missing_or_unknown_units() {
        let bad = [
            ("30", "missing unit"),
            ("", "empty"),
            ("5d", "unknown unit"),
            ("1.5s", "fractions"),
            ("-1s", "expected a number"),
            ("s", "expected a number"),
            ("5 s", "missing unit"),
            ("99999999999999999999s", "too large"),
            ("9999999999999999999h", "too large"),
        ];
        for (input, want) in bad {
            let err = parse_duration(input).expect_err(input);
            assert!(err.contains(want), "{input}: {err}");
        }
    }
}
