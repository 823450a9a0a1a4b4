package dev.xpertfl.device;

import dev.xpertfl.fleet.Json;
import dev.xpertfl.fleet.NdArray;
import dev.xpertfl.fleet.Records.ArrayRecord;
import dev.xpertfl.fleet.Records.ConfigRecord;
import dev.xpertfl.fleet.Records.RecordDict;
import java.io.File;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.security.MessageDigest;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

/**
 * A pLLM as data, like {@code xpert_fl.adapters.Adapter}: the PEFT LoRA config, float32 tensors
 * (PEFT names, e.g. {@code base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight}) and the
 * fingerprint of the base model it belongs to. {@link #contentHash()} is the same identity the
 * server uses for cache ids, so the device can check that it received what it chose.
 */
public final class Adapter {
    /** A malformed adapter, one for another base model, or one that does not fit the trainer. */
    public static final class AdapterException extends IllegalArgumentException {
        public AdapterException(String message) {
            super(message);
        }
    }

    public static final String FINGERPRINT_KEY = "xpert_base_fingerprint";

    public final Map<String, Object> config;
    public final TreeMap<String, NdArray> tensors;
    public final String baseFingerprint;

    public Adapter(Map<String, Object> config, Map<String, NdArray> tensors, String baseFingerprint) {
        this.config = Collections.unmodifiableMap(new LinkedHashMap<>(config));
        this.tensors = new TreeMap<>(tensors);
        this.baseFingerprint = baseFingerprint;
        for (Map.Entry<String, NdArray> e : this.tensors.entrySet()) {
            if (!e.getValue().dtype.equals("float32")) {
                throw new AdapterException("adapter tensor " + e.getKey() + " is " + e.getValue().dtype + ", expected float32");
            }
        }
    }

    public int rank() {
        Object r = config.get("r");
        if (!(r instanceof Long)) throw new AdapterException("adapter config 'r' must be an integer, got " + r);
        return ((Long) r).intValue();
    }

    /** PEFT's scaling: alpha / r (alpha / sqrt(r) with rsLoRA). */
    public double scaling() {
        Object a = config.get("lora_alpha");
        if (!(a instanceof Number)) throw new AdapterException("adapter config 'lora_alpha' must be a number, got " + a);
        double alpha = ((Number) a).doubleValue();
        return Boolean.TRUE.equals(config.get("use_rslora")) ? alpha / Math.sqrt(rank()) : alpha / rank();
    }

    public long numBytes() {
        long n = 0;
        for (NdArray t : tensors.values()) n += t.data.length;
        return n;
    }

    /**
     * Python's {@code Adapter.content_hash}: SHA-256 over the JSON (sorted keys) of r, lora_alpha,
     * sorted target_modules, use_rslora and the base fingerprint, then per tensor (sorted by name)
     * {@code "name:(d0, d1)"} and its float32 bytes; the first 20 hex digits.
     */
    public String contentHash() {
        try {
            MessageDigest h = MessageDigest.getInstance("SHA-256");
            Map<String, Object> ident = new TreeMap<>();
            ident.put("r", config.get("r"));
            ident.put("lora_alpha", config.get("lora_alpha"));
            List<String> targets = new ArrayList<>();
            Object t = config.get("target_modules");
            if (t instanceof List) for (Object o : (List<?>) t) targets.add(String.valueOf(o));
            else if (t instanceof String) targets.add((String) t); // Python sorts the string's characters; never used by PEFT adapters here
            Collections.sort(targets);
            ident.put("target_modules", targets);
            ident.put("use_rslora", config.get("use_rslora"));
            ident.put("base_fingerprint", baseFingerprint);
            h.update(Json.dumpsSorted(ident).getBytes(StandardCharsets.UTF_8));
            for (Map.Entry<String, NdArray> e : tensors.entrySet()) {
                h.update((e.getKey() + ":" + pyTuple(e.getValue().shape)).getBytes(StandardCharsets.UTF_8));
                h.update(e.getValue().data);
            }
            StringBuilder b = new StringBuilder();
            for (byte x : h.digest()) b.append(String.format("%02x", x));
            return b.substring(0, 20);
        } catch (java.security.NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    static String pyTuple(long[] shape) {
        StringBuilder b = new StringBuilder("(");
        for (int i = 0; i < shape.length; i++) b.append(i > 0 ? ", " : "").append(shape[i]);
        if (shape.length == 1) b.append(',');
        return b.append(')').toString();
    }

    // --- records (protocol.adapter_records / parse_adapter) ------------------------------------------
    public void putInto(RecordDict rd, String name) {
        ArrayRecord arrays = new ArrayRecord();
        for (Map.Entry<String, NdArray> e : tensors.entrySet()) arrays.put(e.getKey(), e.getValue());
        rd.put(name + ".arrays", arrays);
        rd.put(name + ".config", new ConfigRecord().put("config", Json.dumpsSorted(config)).put("base", baseFingerprint));
    }

    public static Adapter from(RecordDict rd, String name) {
        ArrayRecord arrays = rd.arrays(name + ".arrays");
        ConfigRecord cfg = rd.config(name + ".config");
        Map<String, Object> config;
        try {
            config = Json.parseObject(cfg.getString("config"));
        } catch (IllegalArgumentException e) {
            throw new AdapterException("adapter '" + name + "': config is not a JSON object (" + e.getMessage() + ")");
        }
        String base = cfg.getString("base");
        if (arrays.arrays.isEmpty()) throw new AdapterException("adapter '" + name + "' holds no tensors");
        Map<String, NdArray> tensors = new LinkedHashMap<>();
        for (Map.Entry<String, NdArray> e : arrays.arrays.entrySet()) {
            NdArray a = e.getValue();
            tensors.put(e.getKey(), a.dtype.equals("float32") ? a : NdArray.ofFloats(a.shape, a.toFloats()));
        }
        return new Adapter(config, tensors, base);
    }

    // --- PEFT directory (adapter_config.json + adapter_model.safetensors) ----------------------------
    public static Adapter loadPeftDir(File dir) throws IOException {
        File cfg = new File(dir, "adapter_config.json");
        File weights = new File(dir, "adapter_model.safetensors");
        if (!cfg.isFile() || !weights.isFile()) throw new AdapterException("adapter " + dir + ": missing adapter_config.json or adapter_model.safetensors");
        Map<String, Object> config = Json.parseObject(new String(Files.readAllBytes(cfg.toPath()), StandardCharsets.UTF_8));
        byte[] st = Files.readAllBytes(weights.toPath());
        Map<String, String> meta = new LinkedHashMap<>();
        Map<String, NdArray> tensors = readSafetensors(st, meta);
        return new Adapter(config, tensors, meta.getOrDefault(FINGERPRINT_KEY, ""));
    }

    /** Minimal safetensors reader (F32/F64 tensors; metadata into {@code meta}). */
    @SuppressWarnings("unchecked")
    static Map<String, NdArray> readSafetensors(byte[] st, Map<String, String> meta) {
        if (st.length < 8) throw new AdapterException("safetensors file truncated");
        long n = ByteBuffer.wrap(st, 0, 8).order(ByteOrder.LITTLE_ENDIAN).getLong();
        if (n < 2 || 8 + n > st.length) throw new AdapterException("safetensors header length " + n + " is invalid");
        Map<String, Object> header = Json.parseObject(new String(st, 8, (int) n, StandardCharsets.UTF_8));
        int base = 8 + (int) n;
        Map<String, NdArray> out = new LinkedHashMap<>();
        for (Map.Entry<String, Object> e : header.entrySet()) {
            if (e.getKey().equals("__metadata__")) {
                for (Map.Entry<String, Object> m : ((Map<String, Object>) e.getValue()).entrySet()) meta.put(m.getKey(), String.valueOf(m.getValue()));
                continue;
            }
            Map<String, Object> info = (Map<String, Object>) e.getValue();
            List<Object> shapeList = (List<Object>) info.get("shape");
            List<Object> off = (List<Object>) info.get("data_offsets");
            long[] shape = new long[shapeList.size()];
            for (int i = 0; i < shape.length; i++) shape[i] = (Long) shapeList.get(i);
            int b = base + ((Long) off.get(0)).intValue();
            int end = base + ((Long) off.get(1)).intValue();
            if (b < base || end > st.length || end < b) throw new AdapterException("safetensors tensor " + e.getKey() + " lies outside the file");
            byte[] data = java.util.Arrays.copyOfRange(st, b, end);
            String dtype = (String) info.get("dtype");
            NdArray a;
            if ("F32".equals(dtype)) a = new NdArray("float32", shape, data);
            else if ("F64".equals(dtype)) a = NdArray.ofFloats(shape, new NdArray("float64", shape, data).toFloats());
            else throw new AdapterException("safetensors tensor " + e.getKey() + " has unsupported dtype " + dtype);
            out.put(e.getKey(), a);
        }
        return out;
    }
}
