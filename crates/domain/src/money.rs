//! Money amounts: decimal strings checked against the currency's minor units.

use crate::codes::currency_decimals;
use rust_decimal::Decimal;
use std::str::FromStr;

/// The form of an amount in a currency with `decimals` minor digits, as a JSON Schema
/// pattern: a whole part without leading zeros below 1000000000, then at most `decimals`
/// decimals (`"12.5"`, `"12.50"`; `"1200"` for JPY).
pub fn amount_pattern(decimals: u32) -> String {
    match decimals {
        0 => "^(0|[1-9][0-9]{0,8})$".to_string(),
        d => format!("^(0|[1-9][0-9]{{0,8}})(\\.[0-9]{{1,{d}}})?$"),
    }
}

/// Like [`amount_pattern`], but more than zero.
pub fn positive_amount_pattern(decimals: u32) -> String {
    let whole = match decimals {
        0 => "[1-9][0-9]{0,8}".to_string(),
        d => format!("[1-9][0-9]{{0,8}}(\\.[0-9]{{1,{d}}})?"),
    };
    // Below one: a fraction of at most `decimals` digits that are not all zero.
    let fractions: Vec<String> = (0..decimals)
        .map(|zeros| {
            let rest = decimals - 1 - zeros;
            format!(
                "{}[1-9]{}",
                "0".repeat(zeros as usize),
                if rest > 0 {
                    format!("[0-9]{{0,{rest}}}")
                } else {
                    String::new()
                }
            )
        })
        .collect();
    if fractions.is_empty() {
        format!("^{whole}$")
    } else {
        format!("^({whole}|0\\.({}))$", fractions.join("|"))
    }
}

/// The most decimals any currency has (BHD, KWD, ...): the form of an amount in any currency.
pub const MAX_DECIMALS: u32 = 3;

/// Parses a non-negative amount of the form [`amount_pattern`] gives for the currency's
/// decimals (2 for an unknown currency). The error is a message for the client.
pub fn parse_amount(text: &str, currency: &str) -> Result<Decimal, String> {
    parse_with_decimals(text, currency_decimals(currency).unwrap_or(2), currency)
}

fn parse_with_decimals(text: &str, decimals: u32, currency: &str) -> Result<Decimal, String> {
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (text, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || fraction.is_some_and(|f| !digits(f)) {
        return Err("must be a decimal string such as \"12.50\"".into());
    }
    if (whole.len() > 1 && whole.starts_with('0')) || whole.len() > 9 {
        return Err(
            "must be a whole number below 1000000000 without leading zeros, then its decimals"
                .into(),
        );
    }
    if fraction.is_some_and(|f| f.len() > decimals as usize) {
        return Err(format!("{currency} allows at most {decimals} decimals"));
    }
    Decimal::from_str(text).map_err(|_| "must be a decimal string such as \"12.50\"".to_string())
}

/// True when `text` is a well-formed amount (with at most [`MAX_DECIMALS`]) that has more
/// decimals than `currency` allows: a request that would fit another currency.
pub fn exceeds_precision(text: &str, currency: &str) -> bool {
    parse_amount(text, currency).is_err()
        && parse_with_decimals(text, MAX_DECIMALS, currency).is_ok()
}

/// Formats an amount with exactly the currency's decimals (`"12.50"`, `"1200"` for JPY).
pub fn format_amount(amount: Decimal, currency: &str) -> String {
    let decimals = currency_decimals(currency).unwrap_or(2);
    let mut rounded = amount.round_dp(decimals);
    rounded.rescale(decimals);
    rounded.to_string()
}

/// The amount in the currency's minor units (cents for USD, yen for JPY), as payment providers
/// take it. `None` when it has more decimals than the currency allows or does not fit.
pub fn to_minor_units(amount: Decimal, currency: &str) -> Option<i64> {
    let decimals = currency_decimals(currency).unwrap_or(2);
    let minor = amount.checked_mul(Decimal::from(10_i64.pow(decimals)))?;
    if minor.fract() != Decimal::ZERO {
        return None;
    }
    i64::try_from(minor).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_amounts_within_the_currency_precision() {
        assert_eq!(parse_amount("12.5", "USD"), Ok(Decimal::new(125, 1)));
        assert_eq!(parse_amount("12.50", "USD"), Ok(Decimal::new(1250, 2)));
        assert_eq!(parse_amount("0", "USD"), Ok(Decimal::ZERO));
        assert_eq!(parse_amount("1200", "JPY"), Ok(Decimal::new(1200, 0)));
        assert_eq!(parse_amount("1.234", "KWD"), Ok(Decimal::new(1234, 3)));
    }

    #[test]
    fn converts_to_minor_units() {
        assert_eq!(to_minor_units(Decimal::new(1250, 2), "USD"), Some(1250));
        assert_eq!(to_minor_units(Decimal::new(1200, 0), "JPY"), Some(1200));
        assert_eq!(to_minor_units(Decimal::new(1234, 3), "KWD"), Some(1234));
        assert_eq!(to_minor_units(Decimal::new(1, 3), "USD"), None);
    }

    #[test]
    fn refuses_negative_overprecise_and_malformed_amounts() {
        assert!(parse_amount("-1", "USD").is_err());
        assert!(parse_amount("1.001", "USD").is_err());
        assert!(parse_amount("1.5", "JPY").is_err());
        assert!(parse_amount("abc", "USD").is_err());
        assert!(parse_amount("1e3", "USD").is_err());
        assert!(parse_amount(" 1", "USD").is_err());
        assert!(parse_amount("", "USD").is_err());
        assert!(parse_amount("99999999999", "USD").is_err());
        assert!(parse_amount("1000000000", "USD").is_err());
        assert!(parse_amount("1.000", "JPY").is_err());
        assert!(parse_amount("1.500", "USD").is_err());
        assert!(parse_amount("01.5", "USD").is_err());
        assert!(parse_amount("-0", "USD").is_err());
        assert!(parse_amount("1.", "USD").is_err());
        assert!(parse_amount(".5", "USD").is_err());
        assert!(exceeds_precision("1.5", "JPY"));
        assert!(exceeds_precision("1.555", "USD"));
        assert!(!exceeds_precision("1.55", "USD"));
        assert!(!exceeds_precision("1.5555", "USD"));
    }

    #[test]
    fn max_decimals_is_the_most_any_currency_has() {
        let most = crate::codes::currencies().map(|(_, d)| d).max();
        assert_eq!(most, Some(MAX_DECIMALS));
    }

    #[test]
    fn the_pattern_says_what_parse_accepts() {
        assert_eq!(positive_amount_pattern(0), "^[1-9][0-9]{0,8}$");
        assert_eq!(
            positive_amount_pattern(2),
            "^([1-9][0-9]{0,8}(\\.[0-9]{1,2})?|0\\.([1-9][0-9]{0,1}|0[1-9]))$"
        );
        assert_eq!(amount_pattern(0), "^(0|[1-9][0-9]{0,8})$");
        assert_eq!(amount_pattern(2), "^(0|[1-9][0-9]{0,8})(\\.[0-9]{1,2})?$");
        assert_eq!(
            parse_amount("999999999.99", "USD"),
            Ok(Decimal::new(99_999_999_999, 2))
        );
    }

    #[test]
    fn formats_with_the_currency_decimals() {
        assert_eq!(format_amount(Decimal::new(125, 1), "USD"), "12.50");
        assert_eq!(format_amount(Decimal::new(1200, 0), "JPY"), "1200");
        assert_eq!(format_amount(Decimal::new(1, 0), "BHD"), "1.000");
    }
}
