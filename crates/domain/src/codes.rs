//! ISO reference codes: countries (3166-1 alpha-2) and currencies (4217, with minor units).

const COUNTRIES: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

/// Currencies that can price an order. Funds codes and precious metals (XAU, XDR, ...) have no
/// minor unit and are not money a shop charges, so they are left out on purpose.
const CURRENCIES: &str = "AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BHD BIF BMD BND BOB BRL BSD BTN BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VED VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG";

const ZERO_DECIMALS: &str = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX VND VUV XAF XOF XPF";
const THREE_DECIMALS: &str = "BHD IQD JOD KWD LYD OMR TND";

/// Every country code [`is_country`] accepts.
pub fn countries() -> impl Iterator<Item = &'static str> {
    COUNTRIES.split(' ')
}

/// Every currency code that can price an order, with its decimals.
pub fn currencies() -> impl Iterator<Item = (&'static str, u32)> {
    CURRENCIES
        .split(' ')
        .filter_map(|code| currency_decimals(code).map(|d| (code, d)))
}

pub fn is_country(code: &str) -> bool {
    code.len() == 2 && COUNTRIES.split(' ').any(|c| c == code)
}

/// The number of decimals the currency allows, or `None` for an unknown code.
pub fn currency_decimals(code: &str) -> Option<u32> {
    if code.len() != 3 || !CURRENCIES.split(' ').any(|c| c == code) {
        return None;
    }
    Some(if ZERO_DECIMALS.split(' ').any(|c| c == code) {
        0
    } else if THREE_DECIMALS.split(' ').any(|c| c == code) {
        3
    } else {
        2
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_common_countries_and_refuses_lowercase_or_unknown_ones() {
        assert!(is_country("US"));
        assert!(is_country("DE"));
        assert!(!is_country("us"));
        assert!(!is_country("XX"));
        assert!(!is_country("USA"));
    }

    #[test]
    fn currency_decimals_follow_iso_4217() {
        assert_eq!(currency_decimals("USD"), Some(2));
        assert_eq!(currency_decimals("JPY"), Some(0));
        assert_eq!(currency_decimals("KWD"), Some(3));
        assert_eq!(currency_decimals("XAU"), None);
        assert_eq!(currency_decimals("usd"), None);
    }
}
