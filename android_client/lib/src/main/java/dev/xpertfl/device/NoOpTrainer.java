package dev.xpertfl.device;

import dev.xpertfl.device.Adapter.AdapterException;
import dev.xpertfl.fleet.NdArray;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * NOT A TRAINER: returns the start adapter unchanged (0 steps). It exists so the JVM integration test
 * can run a complete XPerT round against a real SuperLink without ONNX Runtime; every upload it
 * produces is marked with the metric {@code noop_trainer = 1} and the stop reason
 * {@code "no-op trainer (JVM test): no training"}.
 *
 * <p>It still checks what a real trainer checks: the start adapter must be for the same base model
 * and adapt the same modules with the same input/output sizes as {@code initial} (the stand-in for
 * the ORT artifacts' LoRA parameters); the rank may differ (merges concatenate ranks).
 */
public final class NoOpTrainer implements Trainer {
    private final Adapter initial;

    public NoOpTrainer(Adapter initial) {
        this.initial = initial;
    }

    @Override
    public Adapter initial() {
        return initial;
    }

    @Override
    public void check(Adapter start) {
        if (!start.baseFingerprint.equals(initial.baseFingerprint)) {
            throw new AdapterException("adapter is for base model " + start.baseFingerprint + ", this device's artifacts for "
                    + initial.baseFingerprint);
        }
        if (!start.tensors.keySet().equals(initial.tensors.keySet())) {
            throw new AdapterException("adapter tensors do not match this device's LoRA parameters (" + start.tensors.size() + " vs "
                    + initial.tensors.size() + " tensors, e.g. " + firstDifference(start, initial) + ")");
        }
        for (Map.Entry<String, NdArray> e : initial.tensors.entrySet()) {
            NdArray mine = e.getValue(), theirs = start.tensors.get(e.getKey());
            boolean isA = e.getKey().endsWith("lora_A.weight");
            long mineDim = isA ? mine.shape[1] : mine.shape[0], theirDim = theirs.ndim() == 2 ? (isA ? theirs.shape[1] : theirs.shape[0]) : -1;
            if (theirs.ndim() != 2 || mineDim != theirDim) {
                throw new AdapterException("adapter tensor " + e.getKey() + " has shape " + theirs + ", this device's artifacts expect " + mine);
            }
        }
    }

    private static String firstDifference(Adapter a, Adapter b) {
        for (String k : a.tensors.keySet()) if (!b.tensors.containsKey(k)) return "unexpected " + k;
        for (String k : b.tensors.keySet()) if (!a.tensors.containsKey(k)) return "missing " + k;
        return "none";
    }

    @Override
    public Result train(Adapter start, Map<String, Object> finetune) {
        long t0 = System.nanoTime();
        check(start);
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("steps", 0.0);
        m.put("seconds", (System.nanoTime() - t0) / 1e9);
        m.put("train_seconds", 0.0);
        m.put("samples_consumed", 0.0);
        m.put("noop_trainer", 1.0);
        return new Result(start, m, "no-op trainer (JVM test): no training");
    }
}
