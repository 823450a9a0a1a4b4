package dev.xpertfl.device;

import dev.xpertfl.device.Adapter.AdapterException;
import dev.xpertfl.fleet.NdArray;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.TreeSet;

/**
 * Exact task arithmetic over LoRA adapters by rank concatenation, as {@code xpert_fl.merge}:
 * {@code A = vstack(A_j)}, {@code B = hstack(a_j s_j B_j)}, so {@code B A = sum a_j s_j B_j A_j};
 * the merged config has {@code r = lora_alpha = sum r_j} (scaling 1), no rsLoRA, the union of
 * target modules. Float32 like the Python code; same tensors, same content hash.
 */
public final class Merge {
    private Merge() {}

    private static final String PREFIX = "base_model.model.";
    private static final String A = ".lora_A.weight";
    private static final String B = ".lora_B.weight";

    public static Adapter cat(List<Adapter> parents, List<Double> weights) {
        if (parents.isEmpty() || parents.size() != weights.size()) throw new IllegalArgumentException(parents.size() + " adapters, " + weights.size() + " weights");
        String fp = parents.get(0).baseFingerprint;
        TreeSet<String> targets = new TreeSet<>();
        List<Map<String, NdArray[]>> mods = new ArrayList<>();
        int rNew = 0;
        for (int j = 0; j < parents.size(); j++) {
            Adapter p = parents.get(j);
            if (!p.baseFingerprint.equals(fp)) throw new AdapterException("cannot merge adapters of different base models");
            double w = weights.get(j);
            if (!(w >= 0) || Double.isInfinite(w)) throw new IllegalArgumentException("merge weights must be finite and >= 0");
            Object t = p.config.get("target_modules");
            if (!(t instanceof List)) throw new AdapterException("parent " + j + ": target_modules must be a list");
            for (Object o : (List<?>) t) targets.add((String) o);
            for (String k : new String[] {"use_dora", "lora_bias"}) {
                if (Boolean.TRUE.equals(p.config.get(k))) throw new AdapterException("parent " + j + ": cannot merge exactly with " + k);
            }
            Map<String, NdArray[]> m = new TreeMap<>();
            for (Map.Entry<String, NdArray> e : p.tensors.entrySet()) {
                String name = e.getKey();
                int slot = name.endsWith(A) ? 0 : name.endsWith(B) ? 1 : -1;
                if (!name.startsWith(PREFIX) || slot < 0) throw new AdapterException("parent " + j + ": unexpected tensor " + name);
                String module = name.substring(PREFIX.length(), name.length() - A.length());
                m.computeIfAbsent(module, k -> new NdArray[2])[slot] = e.getValue();
            }
            int r = p.rank();
            for (Map.Entry<String, NdArray[]> e : m.entrySet()) {
                NdArray a = e.getValue()[0], b = e.getValue()[1];
                if (a == null || b == null || a.ndim() != 2 || b.ndim() != 2 || a.shape[0] != r || b.shape[1] != r) {
                    throw new AdapterException("parent " + j + ": module " + e.getKey() + " is not a rank-" + r + " LoRA pair");
                }
            }
            mods.add(m);
            rNew += r;
        }
        TreeSet<String> modules = new TreeSet<>();
        for (Map<String, NdArray[]> m : mods) modules.addAll(m.keySet());
        Map<String, NdArray> out = new LinkedHashMap<>();
        for (String module : modules) {
            long out_ = -1, in = -1;
            for (Map<String, NdArray[]> m : mods) {
                if (m.containsKey(module)) {
                    long o = m.get(module)[1].shape[0], i = m.get(module)[0].shape[1];
                    if (out_ >= 0 && (o != out_ || i != in)) throw new AdapterException("parents disagree on the shape of " + module);
                    out_ = o;
                    in = i;
                }
            }
            float[] aCat = new float[(int) (rNew * in)];
            float[] bCat = new float[(int) (out_ * rNew)];
            int row = 0;
            for (int j = 0; j < parents.size(); j++) {
                int r = parents.get(j).rank();
                NdArray[] pair = mods.get(j).get(module);
                if (pair != null) {
                    float[] a = pair[0].toFloats(), b = pair[1].toFloats();
                    System.arraycopy(a, 0, aCat, (int) (row * in), a.length);
                    float scale = (float) (weights.get(j) * parents.get(j).scaling()); // torch: float32 tensor x python float
                    for (int o = 0; o < out_; o++) for (int c = 0; c < r; c++) bCat[(int) (o * rNew + row + c)] = b[o * r + c] * scale;
                }
                row += r;
            }
            out.put(PREFIX + module + A, NdArray.ofFloats(new long[] {rNew, in}, aCat));
            out.put(PREFIX + module + B, NdArray.ofFloats(new long[] {out_, rNew}, bCat));
        }
        Map<String, Object> config = new LinkedHashMap<>(parents.get(0).config);
        config.put("r", (long) rNew);
        config.put("lora_alpha", (long) rNew);
        config.put("use_rslora", false);
        config.put("target_modules", new ArrayList<Object>(targets));
        config.put("rank_pattern", new LinkedHashMap<String, Object>());
        config.put("alpha_pattern", new LinkedHashMap<String, Object>());
        config.put("init_lora_weights", true);
        return new Adapter(Collections.unmodifiableMap(config), out, fp);
    }
}
