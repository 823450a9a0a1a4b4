package dev.xpertfl.fleet;

import java.math.BigDecimal;
import java.math.BigInteger;
import java.util.ArrayList;
import java.util.Collection;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

/**
 * A small JSON reader/writer that behaves like Python's {@code json} module where it matters.
 *
 * <p>Flower and XPerT write JSON with Python's {@code json.dumps}; object ids are SHA-256 hashes of
 * those bytes, so to produce the same objects as Python we write the same text: separators
 * {@code ", "} and {@code ": "}, {@code ensure_ascii}, integers without a decimal point, floats as
 * Python's {@code repr}, and {@code Infinity}/{@code NaN} literals (Python's {@code allow_nan}).
 * Reading keeps object key order ({@link LinkedHashMap}) and the int/float distinction
 * ({@link Long} or {@link BigInteger} vs {@link Double}). No dependencies (works on Android too).
 */
public final class Json {
    private Json() {}

    /** Thrown for text that is not JSON (the message says where). */
    public static final class JsonException extends IllegalArgumentException {
        public JsonException(String message) {
            super(message);
        }
    }

    // --- reading ---------------------------------------------------------------------------------
    public static Object parse(String text) {
        Parser p = new Parser(text);
        p.ws();
        Object value = p.value();
        p.ws();
        if (p.i != text.length()) throw p.error("trailing characters");
        return value;
    }

    @SuppressWarnings("unchecked")
    public static Map<String, Object> parseObject(String text) {
        Object v = parse(text);
        if (!(v instanceof Map)) throw new JsonException("expected a JSON object, got " + typeName(v));
        return (Map<String, Object>) v;
    }

    public static String typeName(Object v) {
        if (v == null) return "null";
        if (v instanceof Map) return "object";
        if (v instanceof List) return "array";
        if (v instanceof String) return "string";
        if (v instanceof Boolean) return "bool";
        if (v instanceof Double) return "float";
        return "int";
    }

    private static final class Parser {
        final String s;
        int i;

        Parser(String s) {
            this.s = s;
        }

        JsonException error(String what) {
            return new JsonException("invalid JSON at offset " + i + ": " + what);
        }

        void ws() {
            while (i < s.length() && " \t\r\n".indexOf(s.charAt(i)) >= 0) i++;
        }

        Object value() {
            if (i >= s.length()) throw error("unexpected end");
            char c = s.charAt(i);
            switch (c) {
                case '{': return object();
                case '[': return array();
                case '"': return string();
                case 't': return literal("true", Boolean.TRUE);
                case 'f': return literal("false", Boolean.FALSE);
                case 'n': return literal("null", null);
                case 'N': return literal("NaN", Double.NaN);
                case 'I': return literal("Infinity", Double.POSITIVE_INFINITY);
                default:
                    if (c == '-' && s.startsWith("-Infinity", i)) return literal("-Infinity", Double.NEGATIVE_INFINITY);
                    if (c == '-' || (c >= '0' && c <= '9')) return number();
                    throw error("unexpected character '" + c + "'");
            }
        }

        Object literal(String word, Object v) {
            if (!s.startsWith(word, i)) throw error("expected " + word);
            i += word.length();
            return v;
        }

        Object number() {
            int start = i;
            boolean isFloat = false;
            if (s.charAt(i) == '-') i++;
            while (i < s.length()) {
                char c = s.charAt(i);
                if (c >= '0' && c <= '9') {
                    i++;
                } else if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') {
                    isFloat = true;
                    i++;
                } else {
                    break;
                }
            }
            String t = s.substring(start, i);
            try {
                if (isFloat) return Double.parseDouble(t);
                BigInteger big = new BigInteger(t);
                return big.bitLength() < 64 ? (Object) big.longValue() : big;
            } catch (NumberFormatException e) {
                throw error("bad number '" + t + "'");
            }
        }

        String string() {
            i++; // opening quote
            StringBuilder b = new StringBuilder();
            while (true) {
                if (i >= s.length()) throw error("unterminated string");
                char c = s.charAt(i++);
                if (c == '"') return b.toString();
                if (c != '\\') {
                    b.append(c);
                    continue;
                }
                if (i >= s.length()) throw error("unterminated escape");
                char e = s.charAt(i++);
                switch (e) {
                    case '"': b.append('"'); break;
                    case '\\': b.append('\\'); break;
                    case '/': b.append('/'); break;
                    case 'b': b.append('\b'); break;
                    case 'f': b.append('\f'); break;
                    case 'n': b.append('\n'); break;
                    case 'r': b.append('\r'); break;
                    case 't': b.append('\t'); break;
                    case 'u':
                        if (i + 4 > s.length()) throw error("bad \\u escape");
                        try {
                            b.append((char) Integer.parseInt(s.substring(i, i + 4), 16));
                        } catch (NumberFormatException ex) {
                            throw error("bad \\u escape");
                        }
                        i += 4;
                        break;
                    default: throw error("bad escape \\" + e);
                }
            }
        }

        List<Object> array() {
            i++;
            List<Object> out = new ArrayList<>();
            ws();
            if (i < s.length() && s.charAt(i) == ']') {
                i++;
                return out;
            }
            while (true) {
                ws();
                out.add(value());
                ws();
                if (i >= s.length()) throw error("unterminated array");
                char c = s.charAt(i++);
                if (c == ']') return out;
                if (c != ',') throw error("expected ',' or ']'");
            }
        }

        Map<String, Object> object() {
            i++;
            Map<String, Object> out = new LinkedHashMap<>();
            ws();
            if (i < s.length() && s.charAt(i) == '}') {
                i++;
                return out;
            }
            while (true) {
                ws();
                if (i >= s.length() || s.charAt(i) != '"') throw error("expected a string key");
                String key = string();
                ws();
                if (i >= s.length() || s.charAt(i++) != ':') throw error("expected ':'");
                ws();
                out.put(key, value());
                ws();
                if (i >= s.length()) throw error("unterminated object");
                char c = s.charAt(i++);
                if (c == '}') return out;
                if (c != ',') throw error("expected ',' or '}'");
            }
        }
    }

    // --- writing ---------------------------------------------------------------------------------
    /** Like Python's {@code json.dumps(value)}. */
    public static String dumps(Object value) {
        StringBuilder b = new StringBuilder();
        write(b, value, false);
        return b.toString();
    }

    /** Like Python's {@code json.dumps(value, sort_keys=True)}. */
    public static String dumpsSorted(Object value) {
        StringBuilder b = new StringBuilder();
        write(b, value, true);
        return b.toString();
    }

    private static void write(StringBuilder b, Object v, boolean sort) {
        if (v == null) {
            b.append("null");
        } else if (v instanceof String) {
            quote(b, (String) v);
        } else if (v instanceof Boolean) {
            b.append(((Boolean) v) ? "true" : "false");
        } else if (v instanceof Double || v instanceof Float) {
            b.append(pyRepr(((Number) v).doubleValue()));
        } else if (v instanceof Number) {
            b.append(v.toString());
        } else if (v instanceof Map) {
            Map<?, ?> m = (Map<?, ?>) v;
            if (sort) m = new TreeMap<>(m);
            b.append('{');
            boolean first = true;
            for (Map.Entry<?, ?> e : m.entrySet()) {
                if (!first) b.append(", ");
                first = false;
                quote(b, String.valueOf(e.getKey()));
                b.append(": ");
                write(b, e.getValue(), sort);
            }
            b.append('}');
        } else if (v instanceof Collection) {
            b.append('[');
            boolean first = true;
            for (Object o : (Collection<?>) v) {
                if (!first) b.append(", ");
                first = false;
                write(b, o, sort);
            }
            b.append(']');
        } else if (v instanceof long[]) {
            long[] a = (long[]) v;
            b.append('[');
            for (int k = 0; k < a.length; k++) b.append(k > 0 ? ", " : "").append(a[k]);
            b.append(']');
        } else if (v instanceof int[]) {
            int[] a = (int[]) v;
            b.append('[');
            for (int k = 0; k < a.length; k++) b.append(k > 0 ? ", " : "").append(a[k]);
            b.append(']');
        } else if (v instanceof double[]) {
            double[] a = (double[]) v;
            b.append('[');
            for (int k = 0; k < a.length; k++) b.append(k > 0 ? ", " : "").append(pyRepr(a[k]));
            b.append(']');
        } else {
            throw new IllegalArgumentException("cannot write " + v.getClass().getName() + " as JSON");
        }
    }

    private static void quote(StringBuilder b, String s) {
        b.append('"');
        for (int k = 0; k < s.length(); k++) {
            char c = s.charAt(k);
            switch (c) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                case '\r': b.append("\\r"); break;
                case '\t': b.append("\\t"); break;
                case '\b': b.append("\\b"); break;
                case '\f': b.append("\\f"); break;
                default:
                    if (c < 0x20 || c > 0x7e) {
                        b.append(String.format("\\u%04x", (int) c));
                    } else {
                        b.append(c);
                    }
            }
        }
        b.append('"');
    }

    /**
     * Python's {@code repr(float)}: the shortest digits that round-trip, with Python's layout
     * ({@code 16.0}, {@code 0.001}, {@code 1e-05}, {@code 1.5e+16}, {@code inf} written as JSON's
     * {@code Infinity}). Java's {@code Double.toString} is not always shortest before JDK 19, so
     * the digits come from {@link BigDecimal} rounding at increasing precision.
     */
    public static String pyRepr(double d) {
        if (Double.isNaN(d)) return "NaN";
        if (Double.isInfinite(d)) return d > 0 ? "Infinity" : "-Infinity";
        if (d == 0) return (1 / d < 0) ? "-0.0" : "0.0";
        BigDecimal exact = new BigDecimal(d);
        BigDecimal shortest = null;
        for (int p = 1; p <= 17; p++) {
            BigDecimal r = exact.round(new java.math.MathContext(p, java.math.RoundingMode.HALF_EVEN));
            if (r.doubleValue() == d) {
                shortest = r;
                break;
            }
        }
        if (shortest == null) shortest = exact.round(new java.math.MathContext(17));
        String digits = shortest.unscaledValue().abs().toString().replaceAll("0+$", "");
        if (digits.isEmpty()) digits = "0";
        // decimal exponent of the first digit: value = 0.d1d2... x 10^(exp+1)
        int exp = shortest.precision() - shortest.scale() - 1;
        String sign = d < 0 ? "-" : "";
        if (exp < -4 || exp >= 16) { // Python: scientific below 1e-4 and from 1e16 on
            String mant = digits.length() == 1 ? digits : digits.charAt(0) + "." + digits.substring(1);
            return sign + mant + "e" + (exp < 0 ? "-" : "+") + (Math.abs(exp) < 10 ? "0" : "") + Math.abs(exp);
        }
        if (exp < 0) {
            return sign + "0." + zeros(-exp - 1) + digits;
        }
        if (digits.length() <= exp + 1) {
            return sign + digits + zeros(exp + 1 - digits.length()) + ".0";
        }
        return sign + digits.substring(0, exp + 1) + "." + digits.substring(exp + 1);
    }

    private static String zeros(int n) {
        StringBuilder b = new StringBuilder(n);
        for (int k = 0; k < n; k++) b.append('0');
        return b.toString();
    }
}
