//! Small value types shared by the wire protocol and the indicium: algorithms, ZIP codes,
//! mailing dates and money amounts in mills. Each parses once, at the edge, into a value
//! that cannot be invalid.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};

/// Signature algorithm of a vPSD. Both produce fixed 64-byte signatures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum Algorithm {
    /// ECDSA over NIST P-256 with SHA-256; signature is r || s, 32 bytes each, big-endian.
    EcdsaP256,
    /// Ed25519 (RFC 8032), pure, over the payload bytes.
    Ed25519,
}

impl Algorithm {
    pub const fn code(self) -> u8 {
        match self {
            Self::EcdsaP256 => 1,
            Self::Ed25519 => 2,
        }
    }

    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::EcdsaP256),
            2 => Some(Self::Ed25519),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::Ed25519 => "ed25519",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A text that names no known algorithm.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown algorithm `{0}` (expected ecdsa-p256 or ed25519)")]
pub struct UnknownAlgorithm(pub String);

impl FromStr for Algorithm {
    type Err = UnknownAlgorithm;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "ecdsa-p256" => Ok(Self::EcdsaP256),
            "ed25519" => Ok(Self::Ed25519),
            other => Err(UnknownAlgorithm(other.to_owned())),
        }
    }
}

/// A US ZIP code, five digits with an optional +4 extension.
///
/// On the wire it is one u32: `zip5 * 10000 + plus4`, where plus4 `0000` means "no +4"
/// (USPS never assigns 0000 as an add-on). The largest valid value is 999_999_999.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(try_from = "String", into = "String"))]
pub struct Zip(u32);

/// Why a ZIP code was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ZipError {
    #[error("ZIP code `{0}` is not 5 digits or 5+4 digits (12345 or 12345-6789)")]
    Format(String),
    #[error("ZIP code value {0} is out of range")]
    Range(u32),
}

impl Zip {
    pub const WIRE_MAX: u32 = 999_999_999;

    /// From the wire value; fails above 999_999_999.
    pub fn from_wire(value: u32) -> Result<Self, ZipError> {
        if value > Self::WIRE_MAX {
            return Err(ZipError::Range(value));
        }
        Ok(Self(value))
    }

    pub fn new(zip5: u32, plus4: Option<u16>) -> Result<Self, ZipError> {
        let plus4 = u32::from(plus4.unwrap_or(0));
        if zip5 > 99_999 || plus4 > 9_999 {
            return Err(ZipError::Range(
                zip5.saturating_mul(10_000).saturating_add(plus4),
            ));
        }
        Ok(Self(zip5 * 10_000 + plus4))
    }

    pub const fn wire(self) -> u32 {
        self.0
    }

    pub const fn zip5(self) -> u32 {
        self.0 / 10_000
    }

    pub const fn plus4(self) -> Option<u16> {
        match self.0 % 10_000 {
            0 => None,
            // Always below 10_000, so the cast keeps the value.
            plus4 => Some(plus4 as u16),
        }
    }
}

impl fmt::Display for Zip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.plus4() {
            None => write!(f, "{:05}", self.zip5()),
            Some(plus4) => write!(f, "{:05}-{:04}", self.zip5(), plus4),
        }
    }
}

impl FromStr for Zip {
    type Err = ZipError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ZipError::Format(text.to_owned());
        let digits = |part: &str, len: usize| -> Result<u32, ZipError> {
            if part.len() != len || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            part.parse::<u32>().map_err(|_| bad())
        };
        match text.split_once('-') {
            None => Self::new(digits(text, 5)?, None),
            Some((zip5, plus4)) => {
                let plus4 = digits(plus4, 4)?;
                if plus4 == 0 {
                    return Err(bad());
                }
                // plus4 < 10_000 after the 4-digit check.
                Self::new(digits(zip5, 5)?, Some(plus4 as u16))
            }
        }
    }
}

impl TryFrom<String> for Zip {
    type Error = ZipError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Zip> for String {
    fn from(zip: Zip) -> Self {
        zip.to_string()
    }
}

/// A calendar date, stored as days since 2000-01-01 (day 0) in a u16: valid through 2179.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(try_from = "String", into = "String"))]
pub struct MailingDate(u16);

/// Why a date was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DateError {
    #[error("date `{0}` is not YYYY-MM-DD")]
    Format(String),
    #[error("date {0} is outside 2000-01-01..=2179-06-06")]
    Range(String),
}

/// Days from 1970-01-01 to 2000-01-01.
const EPOCH_2000_DAYS: i64 = 10_957;

impl MailingDate {
    pub const fn from_days_since_2000(days: u16) -> Self {
        Self(days)
    }

    pub const fn days_since_2000(self) -> u16 {
        self.0
    }

    /// The date containing the given Unix time (UTC); None outside the representable range.
    pub fn from_unix_seconds(seconds: u64) -> Option<Self> {
        let days = i64::try_from(seconds / 86_400).ok()? - EPOCH_2000_DAYS;
        u16::try_from(days).ok().map(Self)
    }

    /// Unix time (UTC) of this date's midnight.
    pub fn unix_seconds(self) -> u64 {
        // Day 0 is 2000-01-01, after 1970: the sum is positive.
        (EPOCH_2000_DAYS as u64 + u64::from(self.0)) * 86_400
    }

    pub fn from_ymd(year: i64, month: u32, day: u32) -> Result<Self, DateError> {
        let text = format!("{year:04}-{month:02}-{day:02}");
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return Err(DateError::Format(text));
        }
        let days = days_from_civil(year, month, day) - EPOCH_2000_DAYS;
        u16::try_from(days)
            .map(Self)
            .map_err(|_| DateError::Range(text))
    }

    pub fn ymd(self) -> (i64, u32, u32) {
        civil_from_days(i64::from(self.0) + EPOCH_2000_DAYS)
    }
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // day is 1..=31 and month 1..=12 by construction.
    (year, month as u32, day as u32)
}

impl fmt::Display for MailingDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (year, month, day) = self.ymd();
        write!(f, "{year:04}-{month:02}-{day:02}")
    }
}

impl FromStr for MailingDate {
    type Err = DateError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || DateError::Format(text.to_owned());
        let bytes = text.as_bytes();
        if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
            return Err(bad());
        }
        let number = |range: std::ops::Range<usize>| -> Result<u32, DateError> {
            let part = &text[range];
            if !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            part.parse().map_err(|_| bad())
        };
        Self::from_ymd(i64::from(number(0..4)?), number(5..7)?, number(8..10)?)
    }
}

impl TryFrom<String> for MailingDate {
    type Error = DateError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<MailingDate> for String {
    fn from(date: MailingDate) -> Self {
        date.to_string()
    }
}

/// Mills per currency unit: 1 dollar = 1000 mills.
pub const MILLS_PER_UNIT: u64 = 1000;

/// Why a currency amount was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AmountError {
    #[error("amount `{0}` is not a decimal number with at most 3 decimal places (e.g. 0.73, 100, 12.345)")]
    Format(String),
    #[error("amount `{0}` is too large")]
    Overflow(String),
}

/// Parses a decimal currency amount (`0.73`, `100`, `12.345`) exactly into mills.
/// No floating point is involved; more than three decimals is an error, not a rounding.
pub fn parse_amount_mills(text: &str) -> Result<u64, AmountError> {
    let bad = || AmountError::Format(text.to_owned());
    let overflow = || AmountError::Overflow(text.to_owned());
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (text, ""),
    };
    let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) || fraction.len() > 3 {
        return Err(bad());
    }
    if text.ends_with('.') {
        return Err(bad());
    }
    let mut mills: u64 = 0;
    for digit in whole.bytes() {
        mills = mills
            .checked_mul(10)
            .and_then(|m| m.checked_add(u64::from(digit - b'0')))
            .ok_or_else(overflow)?;
    }
    mills = mills.checked_mul(MILLS_PER_UNIT).ok_or_else(overflow)?;
    let mut scale = 100;
    for digit in fraction.bytes() {
        mills = mills
            .checked_add(u64::from(digit - b'0') * scale)
            .ok_or_else(overflow)?;
        scale /= 10;
    }
    Ok(mills)
}

/// Formats mills as a decimal currency amount with three decimals: 730 -> "0.730".
pub fn format_mills(mills: u64) -> String {
    format!("{}.{:03}", mills / MILLS_PER_UNIT, mills % MILLS_PER_UNIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_exactly_into_mills() {
        assert_eq!(parse_amount_mills("0.73").unwrap(), 730);
        assert_eq!(parse_amount_mills("100").unwrap(), 100_000);
        assert_eq!(parse_amount_mills("12.345").unwrap(), 12_345);
        assert_eq!(parse_amount_mills("0.001").unwrap(), 1);
        assert_eq!(parse_amount_mills("0").unwrap(), 0);
        for bad in [
            "", ".5", "1.", "1.2345", "-1", "1e3", "1,00", " 1", "0x10", "1.2.3",
        ] {
            assert!(
                matches!(parse_amount_mills(bad), Err(AmountError::Format(_))),
                "{bad:?} accepted"
            );
        }
        assert!(matches!(
            parse_amount_mills("18446744073709552"),
            Err(AmountError::Overflow(_))
        ));
        assert_eq!(
            parse_amount_mills("18446744073709551.615").unwrap(),
            u64::MAX
        );
    }

    #[test]
    fn mills_format_round_trips() {
        for mills in [0, 1, 730, 100_000, 12_345, u64::MAX] {
            assert_eq!(parse_amount_mills(&format_mills(mills)).unwrap(), mills);
        }
        assert_eq!(format_mills(730), "0.730");
    }

    #[test]
    fn zip_codes_parse_and_format() {
        let zip: Zip = "02134".parse().unwrap();
        assert_eq!(zip.wire(), 21_340_000);
        assert_eq!(zip.to_string(), "02134");
        let zip4: Zip = "20260-0001".parse().unwrap();
        assert_eq!(zip4.plus4(), Some(1));
        assert_eq!(zip4.to_string(), "20260-0001");
        for bad in [
            "1234",
            "123456",
            "12345-",
            "12345-0000",
            "1234a",
            "12345-67890",
        ] {
            assert!(bad.parse::<Zip>().is_err(), "{bad:?} accepted");
        }
        assert!(Zip::from_wire(1_000_000_000).is_err());
    }

    // Computed independently with Python's datetime.
    const UNIX_2026_11_30: u64 = 1_795_996_800;
    const DAYS_2026_11_30: u16 = 9_830;

    #[test]
    fn dates_convert_both_ways() {
        let date: MailingDate = "2000-01-01".parse().unwrap();
        assert_eq!(date.days_since_2000(), 0);
        let date: MailingDate = "2026-11-30".parse().unwrap();
        assert_eq!(date.to_string(), "2026-11-30");
        assert_eq!(
            MailingDate::from_unix_seconds(date.unix_seconds()),
            Some(date)
        );
        assert_eq!(date.unix_seconds(), UNIX_2026_11_30);
        assert_eq!(date.days_since_2000(), DAYS_2026_11_30);
        assert!("2024-02-29".parse::<MailingDate>().is_ok());
        assert!("2025-02-29".parse::<MailingDate>().is_err());
        assert!("1999-12-31".parse::<MailingDate>().is_err());
        assert!("2026-13-01".parse::<MailingDate>().is_err());
        for days in [0u16, 1, 59, 60, 365, 366, 9_000, u16::MAX] {
            let date = MailingDate::from_days_since_2000(days);
            assert_eq!(date.to_string().parse::<MailingDate>().unwrap(), date);
        }
    }

    #[test]
    fn algorithm_codes_and_names() {
        for alg in [Algorithm::EcdsaP256, Algorithm::Ed25519] {
            assert_eq!(Algorithm::from_code(alg.code()), Some(alg));
            assert_eq!(alg.name().parse::<Algorithm>().unwrap(), alg);
        }
        assert_eq!(Algorithm::from_code(0), None);
        assert_eq!(Algorithm::from_code(3), None);
    }
}
