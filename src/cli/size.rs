//! Byte sizes on the command line (`20G`, `64K`, `1TiB`, `4096`) and in human output (`1.5 GiB`).
//!
//! Suffixes are binary multiples, as in `qemu-img`: `K` = 1024, `M` = 1024², `G` = 1024³,
//! `T` = 1024⁴, case-insensitive, optionally followed by `iB` or `B` (`64k`, `64KiB` and `64KB` all
//! mean 65536). A plain number is bytes; a trailing `B` alone is allowed too (`512B`).

use std::fmt;
use std::str::FromStr;

/// A byte count parsed from the command line. Syntax only: whether 0 or an unaligned value is
/// acceptable is decided by the subcommand's config validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_size(s).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Parses a size such as `20G`, `64KiB`, `512`, `1tb`.
pub fn parse_size(input: &str) -> Result<u64, String> {
    let s = input.trim();
    if s.is_empty() {
        return Err(
            "empty size (expected a number of bytes with an optional K/M/G/T suffix)".into(),
        );
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(
            "not a size (expected a number of bytes with an optional K/M/G/T suffix, e.g. 20G)"
                .to_string(),
        );
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ if suffix.starts_with('.') || suffix.starts_with(',') => {
            return Err(
                "fractional sizes are not supported (use a smaller unit, e.g. 1536M)".to_string(),
            )
        }
        _ => {
            return Err(format!(
                "unknown unit '{suffix}' (expected K, M, G or T, optionally followed by iB or B)"
            ))
        }
    };
    let too_large = || "too large (the limit is 2^64 - 1 bytes)".to_string();
    let value: u64 = digits.parse().map_err(|_| too_large())?;
    value.checked_mul(1u64 << shift).ok_or_else(too_large)
}

/// Formats a byte count like `qemu-img`: `20 GiB`, `1.5 MiB`, `512 B` (three significant digits).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let text = if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    };
    // "20.0" reads better as "20", "1.50" as "1.5".
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    format!("{text} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_numbers_are_bytes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size(" 4096 "), Ok(4096));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn suffixes_are_binary_and_case_insensitive_with_optional_ib_or_b() {
        for (text, expected) in [
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("64KiB", 64 << 10),
            ("64kib", 64 << 10),
            ("64KB", 64 << 10),
            ("3M", 3 << 20),
            ("3MiB", 3 << 20),
            ("20G", 20 << 30),
            ("20g", 20 << 30),
            ("20GiB", 20 << 30),
            ("20gb", 20 << 30),
            ("2T", 2 << 40),
            ("2TiB", 2 << 40),
        ] {
            assert_eq!(parse_size(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        for text in [
            "", " ", "G", "abc", "-1", "+5", "1.5G", "1,5G", "5X", "5GiBs", "5 G", "5iB", "0x10",
        ] {
            let err = parse_size(text).expect_err(text);
            assert!(!err.is_empty() && !err.contains('\n'), "{text}: {err}");
        }
        assert!(parse_size("1.5G").unwrap_err().contains("fractional"));
        assert!(parse_size("5X").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn overflow_is_rejected_not_wrapped() {
        assert!(parse_size("18446744073709551616")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("16777216T").unwrap_err().contains("too large"));
        assert_eq!(parse_size("16777215T"), Ok(16_777_215u64 << 40));
        assert!(parse_size("99999999999999999999999G")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn human_sizes_look_like_qemu_img() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1024), "1 KiB");
        assert_eq!(human_size(1536 * 1024), "1.5 MiB");
        assert_eq!(human_size(20 << 30), "20 GiB");
        assert_eq!(human_size((10 << 30) + (512 << 20)), "10.5 GiB");
        assert_eq!(human_size(200 << 20), "200 MiB");
        assert_eq!(human_size(u64::MAX), "16 EiB");
    }
}
