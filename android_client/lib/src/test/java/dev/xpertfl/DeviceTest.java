package dev.xpertfl;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import dev.xpertfl.device.Adapter;
import dev.xpertfl.device.Merge;
import dev.xpertfl.device.Selection;
import dev.xpertfl.device.Selection.Choice;
import dev.xpertfl.fleet.NdArray;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.junit.Test;

/** Selection (Eq. 1/2, NNLS), adapter identity and merge, against values computed with the Python code. */
public class DeviceTest {
    private static final String A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    private static final String B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

    private static Adapter adapter(Object alpha, float sign) {
        float[] a = new float[6], b = new float[8];
        for (int i = 0; i < 6; i++) a[i] = sign * (float) (i / 10.0);
        for (int i = 0; i < 8; i++) b[i] = sign * (float) (i / 10.0);
        Map<String, Object> cfg = new LinkedHashMap<>();
        cfg.put("r", 2L);
        cfg.put("lora_alpha", alpha);
        cfg.put("target_modules", Arrays.asList("q_proj"));
        cfg.put("use_rslora", false);
        cfg.put("peft_type", "LORA");
        Map<String, NdArray> t = new LinkedHashMap<>();
        t.put(A, NdArray.ofFloats(new long[] {2, 3}, a));
        t.put(B, NdArray.ofFloats(new long[] {4, 2}, b));
        return new Adapter(cfg, t, "fp");
    }

    /** Hashes from xpert_fl.adapters.Adapter.content_hash / xpert_fl.merge.merge_adapters on the same tensors. */
    @Test
    public void contentHashAndMergeMatchPython() {
        Adapter a = adapter(4L, 1f);
        Adapter b = adapter(4.0, -3f);
        assertEquals("11ee0f9d22ccf0820d1b", a.contentHash());
        assertEquals("f7614b634a12e33e5c50", b.contentHash());
        Adapter m = Merge.cat(Arrays.asList(a, b), Arrays.asList(0.3, 0.9));
        assertEquals("1bc8f280d23dbd966007", m.contentHash());
        assertEquals(4, m.rank());
        // B_m A_m = sum_j w_j s_j B_j A_j (s = alpha / r = 2)
        float[] am = m.tensors.get(A).toFloats(), bm = m.tensors.get(B).toFloats();
        float[] a1 = a.tensors.get(A).toFloats(), b1 = a.tensors.get(B).toFloats();
        for (int o = 0; o < 4; o++) {
            for (int i = 0; i < 3; i++) {
                double merged = 0, expect = 0;
                for (int r = 0; r < 4; r++) merged += bm[o * 4 + r] * am[r * 3 + i];
                for (int r = 0; r < 2; r++) expect += (0.3 * 2 + 0.9 * 2 * 9) * b1[o * 2 + r] * a1[r * 3 + i];
                assertEquals(expect, merged, 1e-5);
            }
        }
    }

    @Test
    public void nearestIsL1WithFirstTie() {
        List<String> ids = Arrays.asList("x", "y", "z");
        double[][] c = {{1, 0}, {0, 1}, {1, 0}};
        Choice ch = Selection.nearest(new double[] {0.9, 0.2}, ids, c);
        assertEquals("single", ch.kind);
        assertEquals(Arrays.asList("x"), ch.ids);
        assertEquals(0.3, ch.distance, 1e-12);
        assertEquals("base", Selection.nearest(new double[] {1, 1}, Arrays.asList(), new double[0][]).kind);
    }

    @Test
    public void mergeWhenCloserThanNearest() {
        List<String> ids = Arrays.asList("x", "y", "z");
        double[][] c = {{1, 0, 0}, {0, 1, 0}, {0, 0, 1}};
        double[] u = {0.5, 0.25, 0};
        Choice near = Selection.select(u, ids, c, Double.POSITIVE_INFINITY, 3);
        assertEquals("single", near.kind);
        Choice mix = Selection.select(u, ids, c, 0.0, 3);
        assertEquals("merge", mix.kind);
        assertEquals(Arrays.asList("x", "y"), mix.ids);
        assertEquals(0.5, mix.weights.get(0), 1e-12);
        assertEquals(0.25, mix.weights.get(1), 1e-12);
        assertEquals(0.0, mix.distance, 1e-12);
        assertEquals("{\"kind\": \"merge\", \"ids\": [\"x\", \"y\"], \"weights\": [0.5, 0.25], \"distance\": 0.0, \"distances\": {}}",
                mix.toJson());
    }

    @Test
    public void nnlsKeepsWeightsNonNegative() {
        double[][] a = {{1, 1}, {1, -1}, {0, 0}};
        double[] x = Selection.nnls(a, new double[] {-1, -3, 0}); // unconstrained: (-2, 1)
        assertEquals(0.0, x[0], 1e-12);
        assertEquals(1.0, x[1], 1e-12);
    }

    @Test
    public void dimensionMismatchIsAClearError() {
        try {
            Selection.coordinates(new double[5], new double[][] {{1, 2, 3}});
            fail("mismatch accepted");
        } catch (Selection.DimensionException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("dimension 3 but the device's drift embedding has 5"));
        }
    }
}
