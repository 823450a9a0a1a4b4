package dev.xpertfl.device;

import dev.xpertfl.fleet.Json;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The device side of XPerT's selection, ported from {@code xpert_fl.basis} / {@code xpert_fl.select}:
 * the user's coordinate on the received basis (Eq. 2), the nearest cached pLLM in L1 (Eq. 1) and,
 * when that is farther than {@code delta}, a non-negative merge (NNLS, Lawson-Hanson) of at most
 * {@code maxParents} pLLMs, chosen only if strictly closer. With the "drift" distance, coordinates
 * are first mapped to the drifts they reconstruct ({@link #drifts}) and distances are Euclidean,
 * as {@code select(..., gram=basis.gram)}. Pure Java, float64.
 */
public final class Selection {
    private Selection() {}

    /** The basis's dimensions do not fit the device's embedding or the offered coordinates. */
    public static final class DimensionException extends IllegalArgumentException {
        public DimensionException(String message) {
            super(message);
        }
    }

    /** What the device chose: one pLLM, a weighted merge, or the base model. */
    public static final class Choice {
        public final String kind;
        public final List<String> ids;
        public final List<Double> weights;
        public final double distance;

        public Choice(String kind, List<String> ids, List<Double> weights, double distance) {
            if (!kind.equals("single") && !kind.equals("merge") && !kind.equals("base")) throw new IllegalArgumentException("choice kind " + kind);
            if (ids.size() != weights.size()) throw new IllegalArgumentException(ids.size() + " ids but " + weights.size() + " weights");
            this.kind = kind;
            this.ids = new ArrayList<>(ids);
            this.weights = new ArrayList<>(weights);
            this.distance = distance;
        }

        public static Choice base(double distance) {
            return new Choice("base", new ArrayList<>(), new ArrayList<>(), distance);
        }

        /** The reply: {@code Choice.to_json()} without per-candidate distances (they stay on the device). */
        public String toJson() {
            Map<String, Object> m = new LinkedHashMap<>();
            m.put("kind", kind);
            m.put("ids", ids);
            m.put("weights", weights);
            m.put("distance", distance);
            m.put("distances", new LinkedHashMap<String, Object>());
            return Json.dumps(m);
        }

        /** Parses and validates a choice (as the server echoes it in a train request). */
        @SuppressWarnings("unchecked")
        public static Choice fromJson(String text) {
            Map<String, Object> m = Json.parseObject(text);
            Object kind = m.get("kind");
            Object ids = m.get("ids");
            Object weights = m.get("weights");
            Object distance = m.get("distance");
            if (!(kind instanceof String) || !(ids instanceof List) || !(weights instanceof List) || !(distance instanceof Number)) {
                throw new IllegalArgumentException("malformed choice " + text);
            }
            List<String> i = new ArrayList<>();
            for (Object o : (List<Object>) ids) i.add((String) o);
            List<Double> w = new ArrayList<>();
            for (Object o : (List<Object>) weights) {
                double x = ((Number) o).doubleValue();
                if (!(x >= 0) || Double.isInfinite(x)) throw new IllegalArgumentException("choice weights must be finite and >= 0");
                w.add(x);
            }
            return new Choice((String) kind, i, w, ((Number) distance).doubleValue());
        }

        @Override
        public String toString() {
            return kind + ids + (kind.equals("merge") ? " weights " + weights : "") + String.format(" (L1 %.4f)", distance);
        }
    }

    // --- Eq. 2 --------------------------------------------------------------------------------------
    /** {@code c_i = <e, v_i> / ||v_i||^2} for each basis vector (rows of {@code vectors}, k x d). */
    public static double[] coordinates(double[] e, double[][] vectors) {
        double[] c = new double[vectors.length];
        for (int i = 0; i < vectors.length; i++) {
            if (vectors[i].length != e.length) {
                throw new DimensionException("basis vectors have dimension " + vectors[i].length + " but the device's drift embedding has "
                        + e.length + ": the device's summarizer differs from the server's");
            }
            double dot = 0, norm = 0;
            for (int j = 0; j < e.length; j++) {
                dot += e[j] * vectors[i][j];
                norm += vectors[i][j] * vectors[i][j];
            }
            c[i] = norm > 1e-24 ? dot / norm : 0.0;
        }
        return c;
    }

    /** Coordinates (rows) mapped to the drifts they reconstruct, sum_i c_i v_i: distances between these
     *  are the "drift" selection distance. */
    public static double[][] drifts(double[][] coords, double[][] vectors) {
        double[][] out = new double[coords.length][];
        for (int r = 0; r < coords.length; r++) out[r] = drift(coords[r], vectors);
        return out;
    }

    public static double[] drift(double[] c, double[][] vectors) {
        if (c.length != vectors.length) throw new DimensionException(c.length + " coordinates for " + vectors.length + " basis vectors");
        double[] e = new double[vectors.length == 0 ? 0 : vectors[0].length];
        for (int i = 0; i < c.length; i++) for (int j = 0; j < e.length; j++) e[j] += c[i] * vectors[i][j];
        return e;
    }

    // --- Eq. 1 --------------------------------------------------------------------------------------
    static double dist(double[] a, double[] b, boolean euclidean) {
        double s = 0;
        for (int i = 0; i < a.length; i++) s += euclidean ? (a[i] - b[i]) * (a[i] - b[i]) : Math.abs(a[i] - b[i]);
        return euclidean ? Math.sqrt(s) : s;
    }

    static double norm(double[] a, boolean euclidean) {
        return dist(a, new double[a.length], euclidean);
    }

    /** Nearest pLLM in L1 (first minimum on ties); empty cache: the base model. */
    public static Choice nearest(double[] user, List<String> ids, double[][] coords) {
        return nearest(user, ids, coords, false);
    }

    /** Nearest pLLM in L1, or Euclidean for vectors already mapped by {@link #drifts}. */
    public static Choice nearest(double[] user, List<String> ids, double[][] coords, boolean euclidean) {
        check(user, ids, coords);
        if (ids.isEmpty()) return Choice.base(norm(user, euclidean));
        int best = 0;
        double bestD = Double.POSITIVE_INFINITY;
        for (int i = 0; i < ids.size(); i++) {
            double d = dist(coords[i], user, euclidean);
            if (d < bestD) {
                bestD = d;
                best = i;
            }
        }
        List<String> one = new ArrayList<>();
        one.add(ids.get(best));
        List<Double> w = new ArrayList<>();
        w.add(1.0);
        return new Choice("single", one, w, bestD);
    }

    private static void check(double[] user, List<String> ids, double[][] coords) {
        if (coords.length != ids.size()) throw new DimensionException(coords.length + " coordinate rows for " + ids.size() + " pLLMs");
        for (double[] row : coords) {
            if (row.length != user.length) {
                throw new DimensionException("pLLM coordinates have " + row.length + " entries but the device's coordinate has " + user.length);
            }
        }
        for (double x : user) if (Double.isNaN(x) || Double.isInfinite(x)) throw new IllegalArgumentException("user coordinate contains NaN or Inf");
    }

    /** A few parents and weights >= 0 minimising ||sum a_j c_j - c_u||_2 (NNLS, top maxParents, refit). */
    public static Choice mergeWeights(double[] user, List<String> ids, double[][] coords, int maxParents) {
        return mergeWeights(user, ids, coords, maxParents, false);
    }

    public static Choice mergeWeights(double[] user, List<String> ids, double[][] coords, int maxParents, boolean euclidean) {
        check(user, ids, coords);
        Choice base = Choice.base(norm(user, euclidean));
        if (ids.isEmpty()) return base;
        double[] alpha = nnls(transpose(coords), user);
        List<Integer> order = new ArrayList<>();
        for (int i = 0; i < alpha.length; i++) if (alpha[i] > 0) order.add(i);
        order.sort((a, b) -> Double.compare(alpha[b], alpha[a])); // stable: ties keep coords order
        List<Integer> keep = new ArrayList<>(order.subList(0, Math.min(maxParents, order.size())));
        keep.sort(Integer::compare);
        if (keep.isEmpty()) return base;
        double[][] sub = new double[keep.size()][];
        for (int j = 0; j < keep.size(); j++) sub[j] = coords[keep.get(j)];
        double[] refit = nnls(transpose(sub), user);
        List<String> pid = new ArrayList<>();
        List<Double> pw = new ArrayList<>();
        double[] merged = new double[user.length];
        for (int j = 0; j < keep.size(); j++) {
            if (refit[j] > 0) {
                pid.add(ids.get(keep.get(j)));
                pw.add(refit[j]);
                for (int k = 0; k < merged.length; k++) merged[k] += refit[j] * coords[keep.get(j)][k];
            }
        }
        if (pid.isEmpty()) return base;
        return new Choice("merge", pid, pw, dist(merged, user, euclidean));
    }

    /** Nearest if within delta, else a merge if strictly closer, else the nearest. */
    public static Choice select(double[] user, List<String> ids, double[][] coords, double delta, int maxParents) {
        return select(user, ids, coords, delta, maxParents, false);
    }

    public static Choice select(double[] user, List<String> ids, double[][] coords, double delta, int maxParents,
                                boolean euclidean) {
        if (Double.isNaN(delta) || delta < 0) throw new IllegalArgumentException("delta must be >= 0, got " + delta);
        Choice best = nearest(user, ids, coords, euclidean);
        if (best.kind.equals("base") || best.distance <= delta) return best;
        Choice mix = mergeWeights(user, ids, coords, maxParents, euclidean);
        return mix.distance < best.distance ? mix : best;
    }

    // --- NNLS (Lawson-Hanson, as xpert_fl.select.nnls) ----------------------------------------------
    static double[][] transpose(double[][] a) {
        int m = a.length, n = m == 0 ? 0 : a[0].length;
        double[][] t = new double[n][m];
        for (int i = 0; i < m; i++) for (int j = 0; j < n; j++) t[j][i] = a[i][j];
        return t;
    }

    /** argmin_{x >= 0} ||a x - b||_2 for a (m x n). */
    public static double[] nnls(double[][] a, double[] b) {
        int m = a.length, n = m == 0 ? 0 : a[0].length;
        double[] x = new double[n];
        if (n == 0 || m == 0) return x;
        double normA = 0, normB = 0;
        for (double[] row : a) for (double v : row) normA += v * v;
        for (double v : b) normB += v * v;
        double tol = 10 * Math.ulp(1.0) * Math.max(m, n) * Math.max(1.0, Math.sqrt(normA) * Math.max(Math.sqrt(normB), 1.0));
        int maxIter = 3 * n + 30;
        boolean[] passive = new boolean[n];
        double[] w = gradient(a, b, x);
        int it = 0;
        while (!all(passive) && anyAbove(w, passive, tol) && it < maxIter) {
            int j = -1;
            for (int k = 0; k < n; k++) if (!passive[k] && (j < 0 || w[k] > w[j])) j = k;
            passive[j] = true;
            double[] s = solvePassive(a, b, passive);
            while (it < maxIter && anyNonPositive(s, passive)) {
                it++;
                double step = 1.0;
                for (int k = 0; k < n; k++) {
                    if (passive[k] && s[k] <= 0) {
                        double denom = x[k] - s[k];
                        double ratio = denom > 0 ? x[k] / denom : 0.0;
                        step = Math.min(step, ratio);
                    }
                }
                for (int k = 0; k < n; k++) x[k] = x[k] + step * (s[k] - x[k]);
                for (int k = 0; k < n; k++) {
                    passive[k] = passive[k] && x[k] > tol;
                    if (!passive[k]) x[k] = 0.0;
                }
                s = solvePassive(a, b, passive);
            }
            x = s;
            it++;
            w = gradient(a, b, x);
        }
        for (int k = 0; k < n; k++) x[k] = Math.max(0.0, x[k]);
        return x;
    }

    private static boolean all(boolean[] p) {
        for (boolean v : p) if (!v) return false;
        return true;
    }

    private static boolean anyAbove(double[] w, boolean[] passive, double tol) {
        for (int k = 0; k < w.length; k++) if (!passive[k] && w[k] > tol) return true;
        return false;
    }

    private static boolean anyNonPositive(double[] s, boolean[] passive) {
        for (int k = 0; k < s.length; k++) if (passive[k] && s[k] <= 0) return true;
        return false;
    }

    private static double[] gradient(double[][] a, double[] b, double[] x) {
        int m = a.length, n = a[0].length;
        double[] r = new double[m];
        for (int i = 0; i < m; i++) {
            double v = b[i];
            for (int j = 0; j < n; j++) v -= a[i][j] * x[j];
            r[i] = v;
        }
        double[] w = new double[n];
        for (int j = 0; j < n; j++) for (int i = 0; i < m; i++) w[j] += a[i][j] * r[i];
        return w;
    }

    /** Least squares on the passive columns (Householder QR; dependent columns get 0). */
    private static double[] solvePassive(double[][] a, double[] b, boolean[] passive) {
        int m = a.length, n = a[0].length;
        List<Integer> cols = new ArrayList<>();
        for (int j = 0; j < n; j++) if (passive[j]) cols.add(j);
        double[] s = new double[n];
        if (cols.isEmpty()) return s;
        double[] sol = leastSquares(a, b, cols);
        for (int j = 0; j < cols.size(); j++) s[cols.get(j)] = sol[j];
        return s;
    }

    static double[] leastSquares(double[][] a, double[] b, List<Integer> cols) {
        int m = a.length, p = cols.size();
        double[][] q = new double[m][p];
        for (int i = 0; i < m; i++) for (int j = 0; j < p; j++) q[i][j] = a[i][cols.get(j)];
        double[] y = b.clone();
        double[] diag = new double[p];
        boolean[] dependent = new boolean[p];
        double scale = 0;
        for (double[] row : q) for (double v : row) scale = Math.max(scale, Math.abs(v));
        int steps = Math.min(m, p);
        for (int k = 0; k < p; k++) {
            if (k >= steps) {
                dependent[k] = true;
                continue;
            }
            double norm = 0;
            for (int i = k; i < m; i++) norm += q[i][k] * q[i][k];
            norm = Math.sqrt(norm);
            if (norm <= 1e-12 * Math.max(scale, 1e-300)) {
                dependent[k] = true;
                continue;
            }
            double alpha = q[k][k] > 0 ? -norm : norm;
            double[] v = new double[m];
            for (int i = k; i < m; i++) v[i] = q[i][k];
            v[k] -= alpha;
            double vv = 0;
            for (int i = k; i < m; i++) vv += v[i] * v[i];
            if (vv == 0) {
                diag[k] = q[k][k];
                continue;
            }
            for (int j = k; j < p; j++) {
                double d = 0;
                for (int i = k; i < m; i++) d += v[i] * q[i][j];
                d = 2 * d / vv;
                for (int i = k; i < m; i++) q[i][j] -= d * v[i];
            }
            double d = 0;
            for (int i = k; i < m; i++) d += v[i] * y[i];
            d = 2 * d / vv;
            for (int i = k; i < m; i++) y[i] -= d * v[i];
            diag[k] = q[k][k];
        }
        double[] x = new double[p];
        for (int k = p - 1; k >= 0; k--) {
            if (dependent[k] || k >= m) continue;
            double v = y[k];
            for (int j = k + 1; j < p; j++) v -= q[k][j] * x[j];
            x[k] = v / diag[k];
        }
        return x;
    }
}
