-- Argo CD health check for kubetune.dev/FineTuneJob (resource.customizations.health.kubetune.dev_FineTuneJob).
-- Reads the conditions, which are the authority (status.phase is only their summary). A status
-- written for an older generation is not trusted: the operator has not looked at the change yet.
local hs = {status = "Progressing", message = "Waiting for the kubetune operator"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local conditions = {}
for _, condition in ipairs(obj.status.conditions) do
  conditions[condition.type] = condition
end
local function is_true(kind)
  return conditions[kind] ~= nil and conditions[kind].status == "True"
end
local function describe(kind)
  local condition = conditions[kind]
  local message = condition.reason or kind
  if condition.message ~= nil and condition.message ~= "" then
    message = message .. ": " .. condition.message
  end
  return message
end
if is_true("Failed") then
  hs.status = "Degraded"
  hs.message = describe("Failed")
elseif conditions["Feasible"] ~= nil and conditions["Feasible"].status == "False" then
  hs.status = "Degraded"
  hs.message = describe("Feasible")
elseif is_true("Succeeded") then
  hs.status = "Healthy"
  hs.message = describe("Succeeded")
  if obj.status.result ~= nil and obj.status.result.uri ~= nil then
    hs.message = hs.message .. " (" .. obj.status.result.uri .. ")"
  end
elseif is_true("Suspended") then
  hs.status = "Suspended"
  hs.message = describe("Suspended")
else
  hs.status = "Progressing"
  if conditions["Running"] ~= nil then
    hs.message = describe("Running")
  end
  if obj.status.progress ~= nil and obj.status.progress.summary ~= nil then
    hs.message = hs.message .. " (" .. obj.status.progress.summary .. ")"
  end
end
return hs
