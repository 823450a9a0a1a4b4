package dev.xpertfl.fleet;

import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Flower's records as plain Java values: a {@link RecordDict} maps names to an {@link ArrayRecord}
 * (named {@link NdArray}s), a {@link ConfigRecord} (bool/int/float/str/bytes or lists of one of
 * them) or a {@link MetricRecord} (int/float or lists). Insertion order is kept, as in Python,
 * because it is part of the serialized bytes (and so of the object ids).
 *
 * <p>Value types: {@code Boolean}, {@code Long}, {@code Double}, {@code String}, {@code byte[]} and
 * {@code List} of one of those. {@code Integer}/{@code Float} are accepted when building and
 * widened.
 */
public final class Records {
    private Records() {}

    /** A record whose name or type does not match what the reader expects. */
    public static final class RecordException extends IllegalArgumentException {
        public RecordException(String message) {
            super(message);
        }
    }

    /** One of ArrayRecord, ConfigRecord, MetricRecord. */
    public interface Record {}

    public static final class ArrayRecord implements Record {
        public final Map<String, NdArray> arrays = new LinkedHashMap<>();

        public ArrayRecord put(String name, NdArray array) {
            arrays.put(name, array);
            return this;
        }

        public NdArray get(String name) {
            NdArray a = arrays.get(name);
            if (a == null) throw new RecordException("array record has no array '" + name + "' (has " + arrays.keySet() + ")");
            return a;
        }
    }

    /** Shared by ConfigRecord and MetricRecord. */
    public abstract static class ValueRecord implements Record {
        public final Map<String, Object> values = new LinkedHashMap<>();

        protected static Object normalize(Object v) {
            if (v instanceof Integer || v instanceof Short || v instanceof Byte) return ((Number) v).longValue();
            if (v instanceof Float) return ((Float) v).doubleValue();
            return v;
        }

        public Object get(String key) {
            return values.get(key);
        }

        public String getString(String key) {
            Object v = values.get(key);
            if (!(v instanceof String)) {
                throw new RecordException("field '" + key + "' must be a string, got " + describe(v));
            }
            return (String) v;
        }

        static String describe(Object v) {
            return v == null ? "nothing" : v.getClass().getSimpleName();
        }
    }

    public static final class ConfigRecord extends ValueRecord {
        public ConfigRecord put(String key, Object value) {
            Object v = normalize(value);
            if (!(v instanceof Boolean || v instanceof Long || v instanceof Double || v instanceof String
                    || v instanceof byte[] || v instanceof List)) {
                throw new RecordException("a ConfigRecord cannot hold " + describe(value) + " ('" + key + "')");
            }
            values.put(key, v);
            return this;
        }
    }

    public static final class MetricRecord extends ValueRecord {
        public MetricRecord put(String key, Object value) {
            Object v = normalize(value);
            if (!(v instanceof Long || v instanceof Double || v instanceof List)) {
                throw new RecordException("a MetricRecord cannot hold " + describe(value) + " ('" + key + "')");
            }
            values.put(key, v);
            return this;
        }
    }

    /** A message's content. */
    public static final class RecordDict {
        public final Map<String, Record> records = new LinkedHashMap<>();

        public RecordDict put(String name, Record record) {
            records.put(name, record);
            return this;
        }

        public Map<String, Record> view() {
            return Collections.unmodifiableMap(records);
        }

        public ConfigRecord config(String name) {
            Record r = records.get(name);
            if (!(r instanceof ConfigRecord)) throw new RecordException("message has no config record '" + name + "'");
            return (ConfigRecord) r;
        }

        public ArrayRecord arrays(String name) {
            Record r = records.get(name);
            if (!(r instanceof ArrayRecord)) throw new RecordException("message has no array record '" + name + "'");
            return (ArrayRecord) r;
        }

        public MetricRecord metrics(String name) {
            Record r = records.get(name);
            if (!(r instanceof MetricRecord)) throw new RecordException("message has no metric record '" + name + "'");
            return (MetricRecord) r;
        }
    }
}
