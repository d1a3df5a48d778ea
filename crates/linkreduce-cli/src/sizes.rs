//! Message sizes on the command line: `4K`, `1M`, `3000`, lists (`1K,3000,1M`)
//! and power-of-two ranges (`1K:256M`).

/// Parses one size with an optional K/M/G suffix (powers of 1024).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let value: usize = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 4096, 64K, 1M, 2G)"))?;
    let scale: usize = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return Err(format!("{text:?} has an unknown unit (use K, M or G)")),
    };
    value
        .checked_mul(scale)
        .filter(|&bytes| bytes > 0)
        .ok_or_else(|| format!("{text:?} is not a positive size that fits in memory"))
}

/// Parses a comma-separated list whose items are sizes or `LOW:HIGH`
/// ranges that double from LOW up to HIGH.
pub fn parse_sizes(text: &str) -> Result<Vec<usize>, String> {
    let mut sizes = Vec::new();
    for item in text.split(',').filter(|s| !s.trim().is_empty()) {
        match item.split_once(':') {
            Some((low, high)) => {
                let (low, high) = (parse_size(low)?, parse_size(high)?);
                if low > high {
                    return Err(format!("range {item:?} runs backwards"));
                }
                let mut size = low;
                while size <= high {
                    sizes.push(size);
                    size = size.saturating_mul(2);
                }
            }
            None => sizes.push(parse_size(item)?),
        }
    }
    if sizes.is_empty() {
        return Err("no sizes given".into());
    }
    sizes.sort_unstable();
    sizes.dedup();
    Ok(sizes)
}

/// `1024` -> `1K`, `3000` -> `3000`.
pub fn format_size(bytes: usize) -> String {
    for (unit, scale) in [("G", 1usize << 30), ("M", 1 << 20), ("K", 1 << 10)] {
        if bytes >= scale && bytes % scale == 0 {
            return format!("{}{unit}", bytes / scale);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_sizes_and_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("K").is_err());
    }

    #[test]
    fn lists_and_ranges_sorted_without_duplicates() {
        assert_eq!(parse_sizes("1K:8K"), Ok(vec![1024, 2048, 4096, 8192]));
        assert_eq!(parse_sizes("3000,1K,1K"), Ok(vec![1024, 3000]));
        assert_eq!(
            parse_sizes("1K:3K,1000000"),
            Ok(vec![1024, 2048, 1_000_000])
        );
        assert!(parse_sizes("8K:1K").is_err());
        assert!(parse_sizes("").is_err());
    }

    #[test]
    fn sizes_print_back() {
        assert_eq!(format_size(1 << 10), "1K");
        assert_eq!(format_size(256 << 20), "256M");
        assert_eq!(format_size(3000), "3000");
        assert_eq!(parse_size(&format_size(1 << 30)), Ok(1 << 30));
    }
}
