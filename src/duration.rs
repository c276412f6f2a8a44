//! Human durations at the edges: parse `60s`, `5m`, `1m30s`, `500ms`, `2h` or a bare
//! number of seconds; format a `Duration` the same way for messages.

use std::time::Duration;

/// Parses a duration like `60`, `60s`, `500ms`, `5m`, `1h`, `1m30s`.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{s:?}: missing unit (use ms, s, m or h)"))?;
        if digits == 0 {
            return Err(format!("{s:?}: expected a number"));
        }
        let (num, after) = rest.split_at(digits);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("{s:?}: bad number {num:?}"))?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let secs_per_unit = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
        };
        let part = Duration::try_from_secs_f64(value * secs_per_unit)
            .map_err(|_| format!("{s:?}: out of range"))?;
        total = total.saturating_add(part);
        rest = next;
    }
    Ok(total)
}

/// Formats a duration compactly: `250ms`, `5s`, `1.5s`, `2m`, `90m`.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse("60").unwrap(), Duration::from_secs(60));
        assert_eq!(parse("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("2h").unwrap(), Duration::from_secs(7200));
    }

    #[test]
    fn rejects_junk() {
        for bad in ["", "s", "5x", "abc", "5 m", "-1s", "1e999s"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format(Duration::from_millis(250)), "250ms");
        assert_eq!(format(Duration::from_secs(5)), "5s");
        assert_eq!(format(Duration::from_secs(300)), "5m");
        assert_eq!(format(Duration::from_millis(1500)), "1.5s");
    }
}
